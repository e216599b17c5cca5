//! memscope: an eBPF allocation profiler and leak detector.
//!
//! The pipeline, one module per stage:
//! - [`preflight`]: privileges and kernel features, checked before anything loads;
//! - [`target`]: the process to profile (started suspended, or a running pid),
//!   and [`proc_tree`]: the processes descended from it;
//! - [`resources`]: descriptors and kernel memory the session will need;
//! - [`bpf`] and [`attach`]: load the kernel programs and put them on the
//!   target's allocator (found by [`allocator`]), at probe sites chosen by
//!   [`probe_site`];
//! - [`follow`] and [`processes`]: follow forks, execs and exits of the
//!   target's processes and keep their live sets right;
//! - [`collect`]: read the kernel maps into a plain-data [`collect::KernelSnapshot`];
//! - [`process_maps`] and [`symbolize`]: turn addresses into frames, from a
//!   cached copy of the target's mappings so it works after the target exits;
//! - [`python`]: find a CPython interpreter in a process, describe its
//!   frames to the kernel walk, and symbolize the Python frames recorded;
//! - [`report`]: the versioned report.json model, built from a snapshot;
//! - [`output`]: the table, folded stacks, flamegraph and JSON renderings;
//! - [`session`]: runs the stages until the target exits, a signal or a deadline.
//!
//! Collection produces plain data, and analysis and rendering are functions
//! of it alone, so every stage past collection is testable without a kernel.

pub mod address_space;
pub mod alert;
pub mod allocator;
pub mod arenas;
pub mod attach;
pub mod background;
pub mod bpf;
pub mod build_id;
pub mod classify;
pub mod collect;
pub mod completeness;
pub mod diff;
pub mod follow;
pub mod fragmentation;
pub mod front;
pub mod gate;
pub mod holds;
pub mod http;
pub mod kernel_btf;
pub mod map_batch;
pub mod mark;
pub mod multi_uprobe;
pub mod output;
pub mod peaks;
pub mod preflight;
pub mod probe_site;
pub mod proc_tree;
pub mod process_maps;
pub mod process_memory;
pub mod processes;
pub mod python;
pub mod report;
pub mod requests;
pub mod resources;
pub mod sampling;
pub mod session;
pub mod shared_array;
pub mod symbolize;
pub mod target;
pub mod timeline;
pub mod units;
pub mod unwind;
pub mod watchdog;
pub mod workers;
