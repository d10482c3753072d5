// Models and data the benchmarks share. WriteBertBase writes a random BERT-base-sized encoder (hidden 768, 12 layers, FFN
// 3072, 30,522-word vocabulary) into `dir` once (seeded: every bench gets the same weights) and returns `dir`;
// an existing model.safetensors there is reused. Not thread-safe; exits the process on an I/O error (benches only).
#ifndef DELTASERVE_TESTS_BENCH_BENCH_MODELS_H_
#define DELTASERVE_TESTS_BENCH_BENCH_MODELS_H_

#include <cstddef>
#include <string>
#include <vector>

namespace deltaserve {
namespace bench {

std::string WriteBertBase(const std::string& dir);

// Up to `max` texts of a file, one per line (TSV: the first column; a first line "sentence" or "text" is a header
// and skipped; empty texts are skipped). An unreadable file gives none.
std::vector<std::string> ReadSentences(const std::string& path, size_t max);

}  // namespace bench
}  // namespace deltaserve

#endif  // DELTASERVE_TESTS_BENCH_BENCH_MODELS_H_
