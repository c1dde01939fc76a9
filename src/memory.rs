//! glibc allocator settings for long-running roles.
//!
//! A projector process moves a steady stream of short-lived buffers between
//! threads: librdkafka's broker threads fill fetch buffers that its consumer
//! threads free, Tokio's workers decode and copy batches. With glibc's
//! defaults (a dynamic mmap threshold that climbs to 32 MiB after the first
//! large free, a trim threshold that climbs with it, eight arenas per core)
//! those buffers end up scattered through heaps that are never given back:
//! `ops/bench/project.sh` measured a resident peak of 203 MiB for five
//! projectors catching up on a backlog, 152 MiB with the settings below and
//! the same throughput.
//!
//! Each setting is left alone when its `MALLOC_…_` environment variable is
//! set: glibc has applied the operator's value already.

use std::ffi::c_int;

/// Allocations from this size up get their own mapping, returned on free.
const MMAP_THRESHOLD_BYTES: c_int = 128 * 1024;
/// Free memory at the top of a heap beyond this is returned to the kernel.
const TRIM_THRESHOLD_BYTES: c_int = 128 * 1024;

/// Applies the settings; call first thing in `main`, before any thread starts
/// (arenas are chosen per thread at its first allocation).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_allocator() {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    // One arena per core serves as many threads as can run at once; more only
    // spread the same buffers over more heaps.
    let arenas = c_int::try_from(cores.max(2)).unwrap_or(c_int::MAX);
    set(
        "MALLOC_MMAP_THRESHOLD_",
        libc::M_MMAP_THRESHOLD,
        MMAP_THRESHOLD_BYTES,
    );
    set(
        "MALLOC_TRIM_THRESHOLD_",
        libc::M_TRIM_THRESHOLD,
        TRIM_THRESHOLD_BYTES,
    );
    set("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, arenas);
}

/// Other C libraries have other allocators: nothing to tune.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set(variable: &str, parameter: c_int, value: c_int) {
    if std::env::var_os(variable).is_some() {
        return;
    }
    // SAFETY: `mallopt` only changes allocator parameters; it is called before
    // the process starts any thread, and with parameters and values glibc
    // documents. It reports a refusal by returning 0, which leaves the
    // defaults in place: nothing to undo.
    #[allow(unsafe_code)]
    let accepted = unsafe { libc::mallopt(parameter, value) };
    if accepted == 0 {
        eprintln!("note: the allocator refused {variable}={value}; keeping its default");
    }
}
