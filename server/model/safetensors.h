// SafetensorsFile: a read-only, memory-mapped safetensors file (https://github.com/huggingface/safetensors format:
// u64 little-endian header length N, N bytes of JSON header, then the data region).
//
// Open() validates everything before any tensor is handed out, and trusts no number in the file: the header length
// against the file size and a cap, the JSON syntax, every dtype (F32, F16, BF16, I64, I32, I16, I8, U8, BOOL are
// known; only F32/F16/BF16/I64/I32 can be materialised as at::Tensor), every shape (non-negative, product without
// overflow), every data_offsets pair (ordered, inside the data region, size == product(shape) * itemsize), and that
// tensors neither overlap nor leave holes. Any violation is an INVALID_ARGUMENT naming the file and the tensor.
//
// Owns the mapping; tensors returned by View() borrow it (zero copy) and must not outlive the SafetensorsFile,
// tensors returned by Load() are owned copies converted to the requested dtype.
// FromBuffer() does the same over bytes already in memory (e.g. a delta pack received over the network): the same
// validation, the object owns the bytes, and path() is the display name used in error messages.
// Thread-safe after Open() / FromBuffer(): all methods are const.
#ifndef DELTASERVE_SERVER_MODEL_SAFETENSORS_H_
#define DELTASERVE_SERVER_MODEL_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ATen/core/Tensor.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace deltaserve {
namespace model {

enum class SafetensorsDtype { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU8, kBool };

struct SafetensorsEntry {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offset into the data region
  uint64_t end = 0;    // one past the last byte
};

class SafetensorsFile {
 public:
  struct Options {
    // Largest JSON header accepted, in bytes (the format itself caps it at 100 MB).
    uint64_t max_header_bytes = 100ull << 20;
  };

  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path, const Options& options);
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path) {
    return Open(path, Options());
  }
  // The same as Open() over `bytes` held in memory (owned by the returned object). Errors are INVALID_ARGUMENT
  // prefixed with `display_name` instead of a path.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBuffer(std::string bytes, const Options& options,
                                                                     absl::string_view display_name = "<memory>");
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Tensor names in file order (sorted by offset).
  std::vector<std::string> names() const;
  bool contains(absl::string_view name) const;
  // The "__metadata__" string map of the header (empty when absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  absl::StatusOr<SafetensorsEntry> entry(absl::string_view name) const;
  // Raw bytes of a tensor inside the mapping.
  absl::StatusOr<absl::string_view> bytes(absl::string_view name) const;

  // A zero-copy CPU tensor over the mapping in the file's dtype. REQUIRES: the file outlives the tensor, and the
  // tensor is never written to (the mapping is read-only: a write faults; a FromBuffer() object's bytes would be
  // silently changed). When the tensor's bytes are not aligned
  // for its type (possible in files from other writers), an owned aligned copy is returned instead.
  // NOT_FOUND when absent; UNIMPLEMENTED for dtypes other than F32/F16/BF16/I64/I32.
  absl::StatusOr<at::Tensor> View(absl::string_view name) const;
  // An owned contiguous CPU copy converted to `dtype` (F16/BF16 widen exactly to F32). NOT_FOUND when absent;
  // INVALID_ARGUMENT when `dtype` is not a real or integral type; UNIMPLEMENTED as for View().
  absl::StatusOr<at::Tensor> Load(absl::string_view name, c10::ScalarType dtype) const;

 private:
  SafetensorsFile() = default;
  // Validates the header and the data region of the `size` bytes at `base` (the mapping or buffer_) and fills the
  // members below. Errors name path_.
  absl::Status Parse(const uint8_t* base, uint64_t size, const Options& options);
  std::string path_;
  std::string buffer_;  // FromBuffer(): the bytes; empty for mapped files
  void* map_ = nullptr;
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data region
  uint64_t data_size_ = 0;
  std::map<std::string, SafetensorsEntry, std::less<>> entries_;
  std::map<std::string, std::string> metadata_;
  std::vector<std::string> order_;  // names sorted by offset
};

// Writes tensors (any of F32/F16/BF16/I64/I32, contiguous or not, CPU) as a safetensors file. Header keys are written
// in sorted order ("__metadata__" first, only when non-empty), compact, padded with spaces to a multiple of 8 bytes;
// data is laid out by descending item size, then name (the reference implementation also puts larger items first), so
// every tensor is aligned for its type. The same tensors always give the same bytes. The file is written to
// "<path>.tmp.<pid>.<n>", fsynced and renamed into place. INVALID_ARGUMENT for another dtype, an undefined tensor, a
// tensor named "__metadata__", or invalid UTF-8 in a name or the metadata; I/O errors name the path and strerror.
absl::Status WriteSafetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// Same, into a string (used by tests and by the delta pack format later).
absl::StatusOr<std::string> SerializeSafetensors(const std::map<std::string, at::Tensor>& tensors,
                                                 const std::map<std::string, std::string>& metadata = {});

}  // namespace model
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_MODEL_SAFETENSORS_H_
