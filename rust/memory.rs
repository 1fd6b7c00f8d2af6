//! Memory hints for the index's large tables: transparent huge pages and software prefetch.
//!
//! The index's hot paths are random reads into tables of tens of megabytes, so they are bound by
//! memory latency and TLB misses. Huge pages cut the TLB misses; on most hosts transparent huge
//! pages are `madvise`-only, so a table asks for them itself. Prefetch lets a walk or a batch
//! have several of its random reads in flight at once instead of one after another.

/// Huge pages are 2 MiB on x86-64 and on most arm64 kernels; a hint on a smaller region is useless.
const HUGE_PAGE: usize = 2 << 20;

/// Ask the kernel to back the whole 2 MiB pages inside `[ptr, ptr + bytes)` with transparent
/// huge pages. Call it before the memory is first written: pages faulted in afterwards come
/// huge where the kernel can, and nothing changes where it cannot (THP `never`, no THP).
pub fn advise_huge_pages(ptr: *const u8, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
        let end = (ptr as usize + bytes) & !(HUGE_PAGE - 1);
        if end > start {
            // SAFETY: the range lies inside one live allocation owned by the caller; the
            // advice changes how its pages are backed, never their contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, bytes);
}

/// Start loading the cache line at `ptr` (no effect on correctness; any address is allowed).
#[inline(always)]
pub fn prefetch<T>(ptr: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch never faults, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch(ptr as *const i8, core::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}
