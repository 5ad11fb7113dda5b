// safetensors file I/O. The header (JSON) is parsed and validated in TypeScript; here the data section is
// mapped once and each tensor is a view into the mapping (no second copy of a multi-GB file), and writes
// go to a temporary file that is fsynced and renamed, so a crash or a full disk never leaves a half file.
#include "common.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace difflora {
namespace {

struct Mapping {
  void* base = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (base && base != MAP_FAILED) munmap(base, size);
  }
};

std::string ErrnoMessage(const std::string& what, const std::string& path) {
  return what + " '" + path + "': " + std::strerror(errno);
}

// mapTensors(path, fileSize, dataOffset, entries[{dtype, shape, begin, end}]) → Tensor[]
// Offsets are relative to the data section, as in the safetensors header, and were validated in TS;
// they are checked again here against the mapped size so a bad caller cannot read out of bounds.
Napi::Value MapTensors(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>();
  double expectedSize = info[1].As<Napi::Number>().DoubleValue();
  size_t dataOffset = static_cast<size_t>(info[2].As<Napi::Number>().Int64Value());
  Napi::Array entries = info[3].As<Napi::Array>();

  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Napi::Error::New(env, ErrnoMessage("cannot open", path));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    throw Napi::Error::New(env, ErrnoMessage("cannot stat", path));
  }
  size_t size = static_cast<size_t>(st.st_size);
  if (static_cast<double>(size) != expectedSize) {
    close(fd);
    throw Napi::Error::New(env, "safetensors file '" + path + "' changed size while loading");
  }
  auto mapping = std::make_shared<Mapping>();
  if (size > 0) {
    mapping->base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    mapping->size = size;
  }
  close(fd);
  if (mapping->base == MAP_FAILED) throw Napi::Error::New(env, ErrnoMessage("cannot map", path));

  Napi::Array out = Napi::Array::New(env, entries.Length());
  for (uint32_t i = 0; i < entries.Length(); ++i) {
    Napi::Object e = entries.Get(i).As<Napi::Object>();
    c10::ScalarType dtype = DTypeFromCode(env, e.Get("dtype"));
    Napi::Array shapeJs = e.Get("shape").As<Napi::Array>();
    std::vector<int64_t> shape(shapeJs.Length());
    int64_t numel = 1;
    for (uint32_t k = 0; k < shapeJs.Length(); ++k) {
      shape[k] = shapeJs.Get(k).As<Napi::Number>().Int64Value();
      numel *= shape[k];
    }
    size_t begin = static_cast<size_t>(e.Get("begin").As<Napi::Number>().Int64Value());
    size_t end = static_cast<size_t>(e.Get("end").As<Napi::Number>().Int64Value());
    size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
    if (end < begin || end - begin != nbytes || dataOffset + end > size) {
      throw Napi::Error::New(env, "safetensors file '" + path + "': tensor " + std::to_string(i) + " lies outside the file");
    }
    at::TensorOptions opts = at::TensorOptions().dtype(dtype);
    at::Tensor t;
    if (nbytes == 0) {
      t = at::empty(shape, opts);
    } else {
      char* ptr = static_cast<char*>(mapping->base) + dataOffset + begin;
      auto keep = mapping;  // each view keeps the mapping alive; it is unmapped with the last tensor
      t = at::from_blob(ptr, shape, [keep](void*) mutable { keep.reset(); }, opts);
      // Elements must be aligned for the CPU kernels; writers that do not pad headers break that.
      if (reinterpret_cast<uintptr_t>(ptr) % c10::elementSize(dtype) != 0) t = t.clone();
    }
    out.Set(i, WrapTensor(env, t));
  }
  return out;
}

bool WriteAll(int fd, const char* data, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, data, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    data += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// writeFileAtomic(path, header: Uint8Array, tensors: Tensor[]): header bytes (length prefix included),
// then each tensor's bytes in order, into `path.tmp-<pid>`; fsync; rename over `path`.
Napi::Value WriteFileAtomic(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>();
  Napi::Uint8Array header = info[1].As<Napi::Uint8Array>();
  std::vector<at::Tensor> tensors = UnwrapTensorList(env, info[2], "saveSafetensors");
  std::string tmp = path + ".tmp-" + std::to_string(getpid());

  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw Napi::Error::New(env, ErrnoMessage("cannot create", tmp));
  auto fail = [&](const std::string& what) {
    std::string msg = ErrnoMessage(what, path);
    close(fd);
    unlink(tmp.c_str());
    throw Napi::Error::New(env, msg);
  };
  if (!WriteAll(fd, reinterpret_cast<const char*>(header.Data()), header.ByteLength())) fail("cannot write");
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor c = Guard(env, [&] { return "saveSafetensors(" + Describe(tensors[i]) + ")"; }, [&] {
      return tensors[i].detach().to(at::kCPU).contiguous();
    });
    if (!WriteAll(fd, static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size())) fail("cannot write");
  }
  if (fsync(fd) != 0) fail("cannot sync");
  if (close(fd) != 0) {
    std::string msg = ErrnoMessage("cannot close", path);
    unlink(tmp.c_str());
    throw Napi::Error::New(env, msg);
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    std::string msg = ErrnoMessage("cannot rename into place", path);
    unlink(tmp.c_str());
    throw Napi::Error::New(env, msg);
  }
  return env.Undefined();
}

}  // namespace

void InitSafetensors(Napi::Env env, Napi::Object exports) {
  exports.Set("mapTensors", Napi::Function::New(env, MapTensors));
  exports.Set("writeFileAtomic", Napi::Function::New(env, WriteFileAtomic));
}

}  // namespace difflora
