"""POSIX over the local replica: a kernel-free core and a thin pyfuse3 adapter."""
