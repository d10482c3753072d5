// Where the use-lite tests find their data.
#ifndef DELTASERVE_TESTS_MODEL_USE_LITE_TEST_PATHS_H_
#define DELTASERVE_TESTS_MODEL_USE_LITE_TEST_PATHS_H_

#include <sys/stat.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

namespace deltaserve {
namespace model {
namespace testing {

inline std::string SourceDir() {
  const char* env = std::getenv("DS_SOURCE_DIR");
  if (env != nullptr && *env != '\0') return env;
  return DS_SOURCE_DIR;
}

inline bool PathExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// The converted model: $DS_USE_LITE_DIR, else <source>/models/use-lite. Empty when it is not there.
inline std::string UseLiteModelDir() {
  const char* env = std::getenv("DS_USE_LITE_DIR");
  const std::string dir = env != nullptr && *env != '\0' ? std::string(env) : SourceDir() + "/models/use-lite";
  return PathExists(dir + "/config.json") && PathExists(dir + "/model.safetensors") ? dir : "";
}

inline constexpr char kNoModelMessage[] =
    "converted use-lite model not found (set DS_USE_LITE_DIR or run scripts/get_use_lite.sh BUILD_DIR to create "
    "models/use-lite)";

inline std::string TestDataDir() { return SourceDir() + "/tests/data/use_lite"; }

// The upstream TF.js package files (model.json, shards, vocab.json): the copy scripts/get_use_lite.sh keeps next
// to the converted model, else the project's shared data. Empty when neither is there.
inline std::string SharedTfjsDir() {
  const std::string model_dir = UseLiteModelDir();
  if (!model_dir.empty() && PathExists(model_dir + "/tfjs/model.json")) return model_dir + "/tfjs";
  const std::string dir = SourceDir() + "/../shared/data/use-lite-energetic";
  return PathExists(dir + "/model.json") ? dir : "";
}

inline std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    std::abort();
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

}  // namespace testing
}  // namespace model
}  // namespace deltaserve

#endif  // DELTASERVE_TESTS_MODEL_USE_LITE_TEST_PATHS_H_
