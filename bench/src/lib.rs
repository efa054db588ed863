//! Benchmarks of the nullpunch hot paths (criterion benches arrive with the io_uring engine).
