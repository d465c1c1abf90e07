// Makes the prebuilt library importable as `janus._C`. The module itself is
// empty: importing it runs the TORCH_LIBRARY registrations, and the ops are then
// reached through torch.ops.janus. Only the stable (limited) Python API is used,
// so one binary serves every CPython >= 3.10. On-first-use builds
// (janus/_ext.py) load the ops with torch.ops.load_library and leave this file out.

#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "janus C++ ops, registered under torch.ops.janus on import.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module);
}
