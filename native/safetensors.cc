// safetensors file I/O. The header (JSON) is parsed and validated in TypeScript, which also opens the file
// (non-blocking, fstat-checked: a FIFO or a device never gets here). Here each tensor's bytes are read with
// pread from that descriptor into a new CPU tensor that owns its memory: a file truncated or rewritten while
// (or after) it is loaded gives a short read, reported as an error, never a SIGBUS from a mapping. Writes go
// to a new private temporary file (O_EXCL, never through a symlink) that is fsynced and renamed over the
// target only if the target is still a regular file or absent, so a crash or a full disk never leaves a half
// file and a device node, FIFO or symlink at the path is never replaced.
#include "common.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <random>
#include <sys/stat.h>
#include <unistd.h>

namespace difflora {
namespace {

std::string ErrnoMessage(const std::string& what, const std::string& path) {
  return what + " '" + path + "': " + std::strerror(errno);
}

// readTensor(fd, position, dtypeCode, shape) → Tensor: a new contiguous CPU tensor filled with the
// numel × element-size bytes at `position` of the open file `fd`. The caller validated the header; a file
// that ends early (changed since) is an error naming the byte range, and the partial tensor is freed.
Napi::Value ReadTensor(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  int64_t position = info[1].As<Napi::Number>().Int64Value();
  c10::ScalarType dtype = DTypeFromCode(env, info[2]);
  Napi::Array shapeJs = info[3].As<Napi::Array>();
  std::vector<int64_t> shape(shapeJs.Length());
  for (uint32_t k = 0; k < shapeJs.Length(); ++k) shape[k] = shapeJs.Get(k).As<Napi::Number>().Int64Value();
  if (position < 0) throw Napi::RangeError::New(env, "readTensor: negative file position");

  at::Tensor t = Guard(env, [&] { return std::string("readTensor: cannot allocate the tensor"); }, [&] {
    return at::empty(shape, at::TensorOptions().dtype(dtype));
  });
  char* data = static_cast<char*>(t.data_ptr());
  const size_t nbytes = t.nbytes();
  size_t done = 0;
  while (done < nbytes) {
    size_t chunk = std::min<size_t>(nbytes - done, size_t{1} << 30);  // pread moves at most ~2 GiB per call
    ssize_t n = pread(fd, data + done, chunk, static_cast<off_t>(position + static_cast<int64_t>(done)));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Napi::Error::New(env, std::string("cannot read bytes at ") + std::to_string(position + done) + ": " + std::strerror(errno));
    }
    if (n == 0) {  // end of file: it shrank since the header was checked against its size
      struct stat st;
      int64_t end = fstat(fd, &st) == 0 ? static_cast<int64_t>(st.st_size) : position + static_cast<int64_t>(done);
      throw Napi::Error::New(env, "cannot read bytes [" + std::to_string(position) + ", " + std::to_string(position + nbytes) +
                                      "): the file now ends at byte " + std::to_string(end) + " (it changed while loading)");
    }
    done += static_cast<size_t>(n);
  }
  return WrapTensor(env, t);
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

const char* KindOf(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISLNK(m)) return "a symbolic link";
  return "not a regular file";
}

// "" when `path` is absent or a regular file (not a symlink); else why it must not be replaced.
std::string NotReplaceable(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return errno == ENOENT ? "" : ErrnoMessage("cannot stat", path);
  if (S_ISREG(st.st_mode)) return "";
  return "'" + path + "' exists and is " + KindOf(st.st_mode) + ", not a regular file; refusing to replace it";
}

// A new temporary file next to `path`, created exclusively (O_EXCL: never opens an existing file or follows
// a symlink planted at the name) and private (0600) while it is being written.
int CreateTemp(const std::string& path, std::string& tmp) {
  std::random_device rd;
  for (int attempt = 0; attempt < 16; ++attempt) {
    char suffix[16];
    std::snprintf(suffix, sizeof suffix, "%08x", rd());
    tmp = path + ".tmp-" + std::to_string(getpid()) + "-" + suffix;
    int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd >= 0 || errno != EEXIST) return fd;
  }
  return -1;
}

// writeFileAtomic(path, header: Uint8Array, tensors: Tensor[], mode): header bytes (length prefix
// included), then each tensor's bytes in order, into a new temporary file; chmod to `mode`; fsync; rename
// over `path` after checking again that nothing but a regular file took its place while writing.
Napi::Value WriteFileAtomic(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>();
  Napi::Uint8Array header = info[1].As<Napi::Uint8Array>();
  std::vector<at::Tensor> tensors = UnwrapTensorList(env, info[2], "saveSafetensors");
  mode_t mode = static_cast<mode_t>(info[3].As<Napi::Number>().Uint32Value() & 0777);

  std::string refused = NotReplaceable(path);
  if (!refused.empty()) throw Napi::Error::New(env, refused);
  std::string tmp;
  int fd = CreateTemp(path, tmp);
  if (fd < 0) throw Napi::Error::New(env, ErrnoMessage("cannot create", tmp));
  auto fail = [&](const std::string& msg) {
    if (fd >= 0) close(fd);
    unlink(tmp.c_str());
    throw Napi::Error::New(env, msg);
  };
  if (!WriteAll(fd, reinterpret_cast<const char*>(header.Data()), header.ByteLength())) fail(ErrnoMessage("cannot write", path));
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor c;
    try {
      c = Guard(env, [&] { return "saveSafetensors(" + Describe(tensors[i]) + ")"; }, [&] {
        return tensors[i].detach().to(at::kCPU).contiguous();
      });
    } catch (const Napi::Error& e) {
      fail(e.Message());
    }
    if (!WriteAll(fd, static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size())) fail(ErrnoMessage("cannot write", path));
  }
  if (fchmod(fd, mode) != 0) fail(ErrnoMessage("cannot set the mode of", tmp));
  if (fsync(fd) != 0) fail(ErrnoMessage("cannot sync", path));
  int closed = close(fd);
  fd = -1;
  if (closed != 0) fail(ErrnoMessage("cannot close", path));
  refused = NotReplaceable(path);  // the write may have taken a while: check the target again
  if (!refused.empty()) fail(refused);
  if (rename(tmp.c_str(), path.c_str()) != 0) fail(ErrnoMessage("cannot rename into place", path));
  return env.Undefined();
}

}  // namespace

void InitSafetensors(Napi::Env env, Napi::Object exports) {
  exports.Set("readTensor", Napi::Function::New(env, ReadTensor));
  exports.Set("writeFileAtomic", Napi::Function::New(env, WriteFileAtomic));
}

}  // namespace difflora
