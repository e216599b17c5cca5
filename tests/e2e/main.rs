//! End-to-end tests: the real `memscope` binary, real BPF programs in the
//! running kernel, and fixture programs whose allocations are known to the
//! byte. They need root; under CI=true a missing privilege fails them.

mod support;

mod alloc_family;
mod allocators;
mod attach;
mod check;
mod empty_programs;
mod errors;
mod example;
mod exec_failure;
mod flask_service;
mod leak_basic;
mod mapped;
mod output;
mod process_memory;
mod process_trees;
mod processes;
mod python;
mod python_frames;
mod requests;
mod rust_fixture;
mod sampling;
mod scale;
mod stacks;
mod stopping;
mod threads;
mod unwinding;
mod verifier;
mod windows;
