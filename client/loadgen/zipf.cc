#include "client/loadgen/zipf.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace deltaserve {
namespace loadgen {

absl::StatusOr<ZipfSampler> ZipfSampler::Create(int64_t n, double s) {
  if (n < 1 || n > 100000000) {
    return absl::InvalidArgumentError(absl::StrCat("zipf: the number of tasks must be in [1, 1e8], got ", n));
  }
  if (!(s >= 0 && s <= 10)) {  // also rejects NaN
    return absl::InvalidArgumentError(absl::StrCat("zipf: the exponent s must be in [0, 10], got ", s));
  }
  std::vector<double> cdf(static_cast<size_t>(n));
  double sum = 0;
  for (int64_t k = 0; k < n; ++k) {
    sum += std::pow(static_cast<double>(k + 1), -s);
    cdf[static_cast<size_t>(k)] = sum;
  }
  for (double& c : cdf) c /= sum;
  cdf.back() = 1.0;
  return ZipfSampler(std::move(cdf), s);
}

int64_t ZipfSampler::Sample(std::mt19937_64& rng) const {
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
  // The first k with cdf[k] > u; u < 1 and cdf.back() == 1, so k < n.
  const auto it = std::upper_bound(cdf_.begin(), cdf_.end(), u);
  return std::min<int64_t>(static_cast<int64_t>(it - cdf_.begin()), n() - 1);
}

double ZipfSampler::Probability(int64_t k) const {
  if (k < 0 || k >= n()) return 0;
  return k == 0 ? cdf_[0] : cdf_[static_cast<size_t>(k)] - cdf_[static_cast<size_t>(k - 1)];
}

int64_t ZipfSampler::HeadCovering(double fraction) const {
  const auto it = std::lower_bound(cdf_.begin(), cdf_.end(), fraction - 1e-12);
  return std::min<int64_t>(static_cast<int64_t>(it - cdf_.begin()) + 1, n());
}

}  // namespace loadgen
}  // namespace deltaserve
