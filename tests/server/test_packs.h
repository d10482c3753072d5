// Delta packs the serving tests push: small, valid for the model they are made for, and different per seed.
// Stateless functions: thread-safe.
#ifndef DELTASERVE_TESTS_SERVER_TEST_PACKS_H_
#define DELTASERVE_TESTS_SERVER_TEST_PACKS_H_

#include <cstdint>
#include <string>

#include "server/model/model.h"

namespace deltaserve {
namespace testing {

// The serialized bytes of a pack with LoRA r=2 on every query/value linear and a two-label ("neg", "pos")
// classification head, for `model` (or, with `fingerprint` set, claiming that backbone). Packs of different
// seeds differ; all have the same size.
std::string LoraHeadPack(const model::Model& model, const std::string& name, uint64_t seed,
                         const std::string& fingerprint = "");

}  // namespace testing
}  // namespace deltaserve

#endif  // DELTASERVE_TESTS_SERVER_TEST_PACKS_H_
