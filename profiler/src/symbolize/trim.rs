//! The frame-trimming policy: the allocator's own frames are not the caller
//! that asked for memory.

use crate::report::Frame;

/// Functions that are the allocator's plumbing rather than the caller that
/// asked for memory: leading frames matching these are dropped so that
/// `frames[0]` is the code that allocated.
const ALLOCATOR_FRAMES: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "free",
    "__libc_",
    "__rust_alloc",
    "__rust_realloc",
    "__rust_alloc_zeroed",
    "__rdl_",
    "__rg_",
    // The alloc crate: Vec, Box, String and their growth plumbing.
    "alloc::",
    "<alloc::",
    "std::sys::alloc::",
    "std::alloc::",
    "<std::alloc::System as core::alloc::global::GlobalAlloc>",
    "operator new",
    "operator new[]",
    // libc's system call wrappers, for mmap sites.
    "mmap",
    "mmap64",
    "__mmap",
    "__mmap64",
    "__GI___mmap64",
    "mremap",
    "__mremap",
    "__GI___mremap",
];

fn is_allocator_frame(frame: &Frame) -> bool {
    ALLOCATOR_FRAMES.iter().any(|prefix| {
        frame.function == *prefix
            || (prefix.ends_with(['_', ':', '>']) && frame.function.starts_with(prefix))
            || frame.function.starts_with(&format!("{prefix}("))
    })
}

/// Drops the allocator's own leading frames; keeps at least one frame.
pub fn trim_allocator_frames(mut frames: Vec<Frame>) -> Vec<Frame> {
    let keep_from = frames
        .iter()
        .position(|f| !is_allocator_frame(f))
        .unwrap_or(frames.len().saturating_sub(1));
    frames.drain(..keep_from);
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(frames: &[Frame]) -> Vec<&str> {
        frames.iter().map(|f| f.function.as_str()).collect()
    }

    #[test]
    fn allocator_frames_are_trimmed() {
        let frames = [
            "__rdl_alloc",
            "alloc::raw_vec::RawVec<T>::grow",
            "app::cache::insert",
            "main",
        ]
        .map(Frame::named)
        .to_vec();
        assert_eq!(
            names(&trim_allocator_frames(frames)),
            ["app::cache::insert", "main"]
        );
        // A function merely named like an allocator prefix stays.
        let frames = vec![Frame::named("malloc_wrapper_user")];
        assert_eq!(
            names(&trim_allocator_frames(frames)),
            ["malloc_wrapper_user"]
        );
        // Only allocator frames: the last one stays.
        let frames = vec![Frame::named("malloc")];
        assert_eq!(names(&trim_allocator_frames(frames)), ["malloc"]);
    }
}
