// ZipfSampler: draws task indices 0..n-1 with P(k) proportional to 1 / (k+1)^s — index 0 the most popular —
// the usual model of how requests spread over many tenants' tasks (s = 0 is uniform; s = 1 is classic Zipf).
//
// Owns its cumulative table (n doubles). Immutable after Create(): Sample() may be called from any number of
// threads, each with its own random engine.
#ifndef DELTASERVE_CLIENT_LOADGEN_ZIPF_H_
#define DELTASERVE_CLIENT_LOADGEN_ZIPF_H_

#include <cstdint>
#include <random>
#include <vector>

#include "absl/status/statusor.h"

namespace deltaserve {
namespace loadgen {

class ZipfSampler {
 public:
  // INVALID_ARGUMENT unless 1 <= n <= 100,000,000 and 0 <= s <= 10.
  static absl::StatusOr<ZipfSampler> Create(int64_t n, double s);

  // An index in [0, n).
  int64_t Sample(std::mt19937_64& rng) const;
  // P(index == k); 0 outside [0, n).
  double Probability(int64_t k) const;
  // The smallest number of most popular indices that together draw at least `fraction` of the samples
  // (e.g. how many tasks take 90 % of the traffic). REQUIRES: 0 < fraction <= 1.
  int64_t HeadCovering(double fraction) const;

  int64_t n() const { return static_cast<int64_t>(cdf_.size()); }
  double s() const { return s_; }

 private:
  ZipfSampler(std::vector<double> cdf, double s) : cdf_(std::move(cdf)), s_(s) {}
  std::vector<double> cdf_;  // cdf_[k] = P(index <= k); cdf_.back() == 1
  double s_ = 0;
};

}  // namespace loadgen
}  // namespace deltaserve

#endif  // DELTASERVE_CLIENT_LOADGEN_ZIPF_H_
