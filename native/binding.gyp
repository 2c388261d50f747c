{
  "target_defaults": {
    "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-strict-aliasing"],
    "cflags_c": ["-std=gnu11"],
    "include_dirs": ["src", "vendor/xxhash"]
  },
  "targets": [
    {
      "target_name": "gangway",
      "sources": [
        "src/addon.c",
        "src/addon/napi-util.c",
        "src/addon/region.c",
        "src/addon/batch.c",
        "src/addon/dedup.c",
        "src/addon/digest.c",
        "src/addon/pagemap.c",
        "src/addon/tmpfile.c",
        "src/addon/notify.c",
        "src/addon/content.c",
        "src/addon/uffd.c",
        "src/addon/pidfd.c",
        "src/addon/channel.c",
        "src/addon/channel-io.c",
        "src/addon/channel-thread.c"
      ],
      "cflags": ["-fvisibility=hidden"],
      "conditions": [
        ["target_arch=='x64'", {
          "dependencies": ["gangway-hash-avx2"],
          "defines": ["GANGWAY_HAVE_AVX2_HASH=1"]
        }]
      ]
    },
    {
      "target_name": "gangway-hash-avx2",
      "type": "static_library",
      "sources": ["src/hash-avx2.c"],
      "cflags": ["-mavx2", "-fPIC"]
    },
    {
      "target_name": "gangway-track",
      "type": "shared_library",
      "product_name": "gangway-track",
      "product_extension": "so",
      "sources": ["src/shim.c"],
      "libraries": ["-ldl"]
    },
    {
      "target_name": "gangway-guest",
      "type": "executable",
      "sources": [
        "src/guest.c",
        "src/guest-options.c",
        "src/guest-memory.c",
        "src/guest-device.c",
        "src/guest-poke.c"
      ]
    }
  ]
}
