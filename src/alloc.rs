//! The process-wide allocator of every program that links bigroc with default features (the CLI,
//! the examples, tests and benchmarks): mimalloc, told to keep freed memory for a while.
//!
//! Tensors are large and short-lived: each op allocates its output, the previous step's activations
//! are freed. The system allocator unmaps such blocks on free and the next one faults in fresh zeroed
//! pages; on CPU that was a third of refine's time (CIFAR ResNet-50, 2 cores: 1.03 -> 1.6 images/s
//! once memory is reused). mimalloc's default returns freed memory to the OS after 10 ms, which
//! between two PGD steps is the same loss (a 10 s delay still gave 12,000 `madvise` calls and 1.4
//! images/s against 1.75 never returning it), so freed memory stays with the process: its footprint
//! is its peak working set until it exits.
//!
//! Embedders with an allocator of their own build bigroc without default features.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, Ordering};

/// How long freed memory stays with the process before mimalloc returns it to the OS: never.
const PURGE_DELAY_MS: std::ffi::c_long = -1;

/// `mi_option_purge_delay` in mimalloc 2's `mi_option_t` (see mimalloc.h).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

static CONFIGURED: AtomicBool = AtomicBool::new(false);

pub struct Allocator;

impl Allocator {
    /// Sets the purge delay before the first allocation (idempotent, so a race between threads is
    /// harmless). An environment variable `MIMALLOC_PURGE_DELAY` still wins.
    #[inline]
    fn configure() {
        if !CONFIGURED.load(Ordering::Relaxed) {
            CONFIGURED.store(true, Ordering::Relaxed);
            if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
                // SAFETY: sets an integer option; mimalloc allows it at any time.
                unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) }
            }
        }
    }
}

// SAFETY: every call forwards to mimalloc's GlobalAlloc implementation.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::configure();
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::configure();
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::configure();
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL_ALLOCATOR: Allocator = Allocator;
