// The model the delta fuzz targets bind packs and PEFT adapters to: a tiny BERT (hidden 8, 2 layers of 2 heads,
// FFN 16, a 40-word vocabulary, 16 positions) with fixed pseudo-random weights, written once into the process's
// scratch directory (fuzz_util.h) and loaded with model::LoadModel. Its fingerprint is the same in every run, so
// the packs of the seed corpus bind to it.
//
// Built on first use and kept for the life of the process; not thread-safe (fuzz targets run on one thread).
#ifndef DELTASERVE_TESTS_FUZZ_TINY_MODEL_H_
#define DELTASERVE_TESTS_FUZZ_TINY_MODEL_H_

#include <string>

#include "server/model/model.h"

namespace deltaserve {
namespace fuzz {

// The model. Aborts when it cannot be built (a bug of the harness, not of the code under test).
const model::Model& TinyBert();

// The model directory TinyBert() is loaded from (config.json, vocab.txt, model.safetensors).
const std::string& TinyBertDir();

}  // namespace fuzz
}  // namespace deltaserve

#endif  // DELTASERVE_TESTS_FUZZ_TINY_MODEL_H_
