"""Tools over the library: benchmarks (`ualm bench ...`), ahead-of-time sizing for a TPU
slice (`ualm bench compile`) and config descriptions (`ualm config show`)."""
