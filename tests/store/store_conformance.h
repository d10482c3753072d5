// The DeltaStore conformance suite: the behaviour of store.h, checked against any implementation. Each
// implementation's test file instantiates it with a factory:
//
//   StoreFactory MemoryFactory() {
//     StoreFactory f;
//     f.name = "Memory";
//     f.create = [](const std::string& dir, const StoreConfig& config) { ... return NewMemoryStore(...); };
//     return f;  // no reopen: the memory store keeps nothing
//   }
//   INSTANTIATE_TEST_SUITE_P(Memory, StoreConformanceTest, ::testing::Values(MemoryFactory()),
//                            StoreFactoryName);
//
// A persistent store also sets `reopen`, and the suite then checks that everything survives closing and opening
// the store again. Each test gets its own empty directory (removed afterwards), which a persistent store uses as
// its root.
#ifndef DELTASERVE_TESTS_STORE_STORE_CONFORMANCE_H_
#define DELTASERVE_TESTS_STORE_STORE_CONFORMANCE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "delta_store/ref_table.h"
#include "delta_store/store.h"
#include "gtest/gtest.h"

namespace deltaserve {
namespace store {

// The status of a Status or a StatusOr, for the DS_*_OK / DS_EXPECT_CODE macros below.
inline const absl::Status& StatusOf(const absl::Status& status) { return status; }
template <typename T>
const absl::Status& StatusOf(const absl::StatusOr<T>& status_or) {
  return status_or.status();
}

// EXPECT/ASSERT that a Status or StatusOr expression is OK, or has a given absl::StatusCode (printing the status
// when not).
#define DS_EXPECT_OK(expr)                                                  \
  do {                                                                      \
    const ::absl::Status ds_status_ = ::deltaserve::store::StatusOf(expr);  \
    EXPECT_TRUE(ds_status_.ok()) << ds_status_;                             \
  } while (0)
#define DS_ASSERT_OK(expr)                                                  \
  do {                                                                      \
    const ::absl::Status ds_status_ = ::deltaserve::store::StatusOf(expr);  \
    ASSERT_TRUE(ds_status_.ok()) << ds_status_;                             \
  } while (0)
#define DS_EXPECT_CODE(expr, expected_code)                                 \
  do {                                                                      \
    const ::absl::Status ds_status_ = ::deltaserve::store::StatusOf(expr);  \
    EXPECT_EQ(ds_status_.code(), (expected_code)) << ds_status_;            \
  } while (0)

// What the suite asks of a store it creates.
struct StoreConfig {
  // Per-tenant quotas.
  QuotaOptions quotas;
  // Largest blob a BlobWriter accepts.
  int64_t max_blob_bytes = int64_t{1} << 20;
};

struct StoreFactory {
  // Names the instantiation in test names ([A-Za-z0-9_] only).
  std::string name = "Store";
  // A new, empty store. `dir` is an empty directory the store may keep its files in.
  std::function<absl::StatusOr<std::unique_ptr<DeltaStore>>(const std::string& dir, const StoreConfig& config)>
      create;
  // Opens the store previously created in `dir` again (the suite destroys the old one first); null for a store
  // that keeps nothing across instances.
  std::function<absl::StatusOr<std::unique_ptr<DeltaStore>>(const std::string& dir, const StoreConfig& config)>
      reopen;
};

// For INSTANTIATE_TEST_SUITE_P's name generator.
std::string StoreFactoryName(const ::testing::TestParamInfo<StoreFactory>& info);

// Not thread-safe (one gtest fixture per test).
class StoreConformanceTest : public ::testing::TestWithParam<StoreFactory> {
 protected:
  void SetUp() override;
  void TearDown() override;

  // The store under test (created in SetUp with a default StoreConfig).
  DeltaStore& store() { return *store_; }
  // Replaces the store with a new, empty one made with `config`.
  void Recreate(const StoreConfig& config);
  // True when the factory can reopen a store.
  bool can_reopen() const { return static_cast<bool>(GetParam().reopen); }
  // Destroys the store and opens it again from its directory. REQUIRES: can_reopen().
  void Reopen();

  // Pushes `data` as the next version of tenant/task, failing the test on error.
  VersionInfo Push(const std::string& tenant, const std::string& task, const std::string& data);

 private:
  std::string root_;  // this test's directory
  std::string dir_;   // the current store's directory (under root_)
  int stores_ = 0;
  StoreConfig config_;
  std::unique_ptr<DeltaStore> store_;
};

}  // namespace store
}  // namespace deltaserve

#endif  // DELTASERVE_TESTS_STORE_STORE_CONFORMANCE_H_
