{
  "targets": [
    {
      "target_name": "difflora",
      "sources": ["<!@(node scripts/torch-paths.cjs sources)"],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "<!@(node scripts/torch-paths.cjs include)"
      ],
      "libraries": ["<!@(node scripts/torch-paths.cjs libs)"],
      "defines": [
        "NAPI_VERSION=8",
        "NODE_ADDON_API_CPP_EXCEPTIONS",
        "NODE_ADDON_API_CPP_EXCEPTIONS_ALL",
        "<!@(node scripts/torch-paths.cjs defines)"
      ],
      "cflags!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti", "-std=gnu++17"],
      "cflags_cc": ["<!@(node scripts/torch-paths.cjs std)", "-fexceptions", "-frtti", "-O2", "-Wno-unused-parameter", "-fopenmp"],
      "ldflags": ["-fopenmp"]
    }
  ]
}
