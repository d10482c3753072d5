// Fuzz target: the safetensors reader (server/model/safetensors.h) over bytes in memory, as a pack pushed over the
// network reaches it (SafetensorsFile::FromBuffer; Open() runs the same Parse over a mapping).
//
// Reaches: the header length and cap, the JSON header, dtypes, shapes, offsets, overlap / hole checks, metadata;
// then, for a file that validates, every accessor (entry, bytes, View, Load to float32), and a round trip: the
// materialisable tensors serialized again must parse back with the same bytes.
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "server/model/safetensors.h"
#include "tests/fuzz/fuzz_util.h"

namespace deltaserve {
namespace {

using model::SafetensorsFile;

int64_t ItemSize(model::SafetensorsDtype dtype) {
  switch (dtype) {
    case model::SafetensorsDtype::kF64:
    case model::SafetensorsDtype::kI64:
      return 8;
    case model::SafetensorsDtype::kF32:
    case model::SafetensorsDtype::kI32:
      return 4;
    case model::SafetensorsDtype::kF16:
    case model::SafetensorsDtype::kBF16:
    case model::SafetensorsDtype::kI16:
      return 2;
    default:
      return 1;
  }
}

void FuzzOne(absl::string_view input) {
  SafetensorsFile::Options options;
  options.max_header_bytes = 1 << 20;
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::FromBuffer(std::string(input), options, "fuzz.safetensors");
  if (!file.ok()) {
    FUZZ_CHECK(file.status().code() == absl::StatusCode::kInvalidArgument);
    return;
  }
  const SafetensorsFile& f = **file;
  std::map<std::string, at::Tensor> views;
  for (const std::string& name : f.names()) {
    FUZZ_CHECK(f.contains(name));
    absl::StatusOr<model::SafetensorsEntry> entry = f.entry(name);
    FUZZ_CHECK(entry.ok());
    int64_t numel = 1;
    for (int64_t d : entry->shape) {
      FUZZ_CHECK(d >= 0);
      numel *= d;
    }
    absl::StatusOr<absl::string_view> bytes = f.bytes(name);
    FUZZ_CHECK(bytes.ok());
    FUZZ_CHECK(static_cast<int64_t>(bytes->size()) == numel * ItemSize(entry->dtype));
    FUZZ_CHECK(entry->end - entry->begin == bytes->size());
    absl::StatusOr<at::Tensor> view = f.View(name);
    if (!view.ok()) {
      FUZZ_CHECK(view.status().code() == absl::StatusCode::kUnimplemented);
      continue;
    }
    FUZZ_CHECK(view->numel() == numel);
    absl::StatusOr<at::Tensor> loaded = f.Load(name, at::kFloat);
    FUZZ_CHECK(loaded.ok());
    FUZZ_CHECK(loaded->numel() == numel);
    views[name] = *view;
  }
  // Round trip: what the writer accepts, the reader reads back byte for byte.
  absl::StatusOr<std::string> again = model::SerializeSafetensors(views, f.metadata());
  if (!again.ok()) return;  // e.g. a name or metadata value the writer refuses (invalid UTF-8)
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> reread =
      SafetensorsFile::FromBuffer(*std::move(again), options, "round-trip");
  FUZZ_CHECK(reread.ok());
  FUZZ_CHECK((*reread)->metadata() == f.metadata());
  FUZZ_CHECK((*reread)->names().size() == views.size());
  for (const auto& [name, view] : views) {
    absl::StatusOr<absl::string_view> a = f.bytes(name);
    absl::StatusOr<absl::string_view> b = (*reread)->bytes(name);
    FUZZ_CHECK(a.ok() && b.ok() && *a == *b);
  }
}

}  // namespace
}  // namespace deltaserve

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  deltaserve::FuzzOne(deltaserve::fuzz::AsView(data, size));
  return 0;
}
