// Process-level setup of the math libraries: which BLAS LibTorch uses, and how many threads.
//
// Debian's LibTorch calls BLAS through libblas.so.3, which the Debian alternatives system points at the reference
// BLAS (about 6 GFLOP/s here), OpenBLAS (about 160) or BLIS (about 60). SelectBlas() makes a per-process choice by
// re-executing the binary with LD_LIBRARY_PATH naming the chosen implementation's directory, so the choice is a
// flag rather than a system setting. Call it first thing in main, before any thread starts. Not thread-safe.
#ifndef DELTASERVE_SERVER_SERVICE_PLATFORM_H_
#define DELTASERVE_SERVER_SERVICE_PLATFORM_H_

#include <string>

#include "absl/status/status.h"

namespace deltaserve {

// `blas` is "openblas", "blis", "reference" or "system" (keep what the dynamic linker finds). For any other
// choice, re-executes the process (once) with the library directory of that choice first in LD_LIBRARY_PATH;
// returns only when no re-exec is needed or it is not possible (the library is not installed: a warning is
// logged and the system BLAS is kept). INVALID_ARGUMENT for an unknown name.
absl::Status SelectBlas(const std::string& blas, char** argv);

// Names the BLAS library loaded into this process: "openblas-openmp", "blis-openmp", "reference", or the
// directory name it was loaded from; "none" when no libblas is mapped.
std::string LoadedBlas();

// Keeps freed memory in the heap instead of returning large blocks to the kernel (glibc mallopt: mmap and trim
// thresholds raised to 1 GiB), so that the activation tensors of every forward pass reuse warm pages rather than
// paying first-touch page faults (about 10 % of a use-lite forward here). Call once, early in main.
void ConfigureAllocator();

// Sets LibTorch's intra-op threads (0 = OMP_NUM_THREADS if set, else every core) and returns the number in use.
int SetIntraOpThreads(int threads);

}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_SERVICE_PLATFORM_H_
