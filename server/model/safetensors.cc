#include "server/model/safetensors.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "c10/core/ScalarType.h"
#include "nlohmann/json.hpp"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; View() reinterprets it in place, which needs a little-endian host"
#endif

namespace deltaserve {
namespace model {
namespace {

constexpr absl::string_view kMetadataKey = "__metadata__";
constexpr uint64_t kHeaderLengthBytes = 8;

struct DtypeInfo {
  absl::string_view name;
  SafetensorsDtype dtype;
  uint64_t itemsize;
};

constexpr DtypeInfo kDtypes[] = {
    {"F32", SafetensorsDtype::kF32, 4},   {"F16", SafetensorsDtype::kF16, 2}, {"BF16", SafetensorsDtype::kBF16, 2},
    {"F64", SafetensorsDtype::kF64, 8},   {"I64", SafetensorsDtype::kI64, 8}, {"I32", SafetensorsDtype::kI32, 4},
    {"I16", SafetensorsDtype::kI16, 2},   {"I8", SafetensorsDtype::kI8, 1},   {"U8", SafetensorsDtype::kU8, 1},
    {"BOOL", SafetensorsDtype::kBool, 1},
};

const DtypeInfo* FindDtype(absl::string_view name) {
  for (const DtypeInfo& info : kDtypes) {
    if (info.name == name) return &info;
  }
  return nullptr;
}

const DtypeInfo& Info(SafetensorsDtype dtype) {
  for (const DtypeInfo& info : kDtypes) {
    if (info.dtype == dtype) return info;
  }
  return kDtypes[0];  // unreachable: every enumerator is in kDtypes
}

// The dtypes that can be materialised as at::Tensor.
std::optional<c10::ScalarType> ToScalarType(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::kF32:
      return c10::ScalarType::Float;
    case SafetensorsDtype::kF16:
      return c10::ScalarType::Half;
    case SafetensorsDtype::kBF16:
      return c10::ScalarType::BFloat16;
    case SafetensorsDtype::kI64:
      return c10::ScalarType::Long;
    case SafetensorsDtype::kI32:
      return c10::ScalarType::Int;
    default:
      return std::nullopt;
  }
}

std::optional<SafetensorsDtype> FromScalarType(c10::ScalarType type) {
  switch (type) {
    case c10::ScalarType::Float:
      return SafetensorsDtype::kF32;
    case c10::ScalarType::Half:
      return SafetensorsDtype::kF16;
    case c10::ScalarType::BFloat16:
      return SafetensorsDtype::kBF16;
    case c10::ScalarType::Long:
      return SafetensorsDtype::kI64;
    case c10::ScalarType::Int:
      return SafetensorsDtype::kI32;
    default:
      return std::nullopt;
  }
}

std::string Quote(absl::string_view name) { return absl::StrCat("'", absl::CEscape(name), "'"); }

absl::Status FileError(const std::string& path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
}

absl::Status TensorError(const std::string& path, absl::string_view name, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", Quote(name), ": ", what));
}

absl::Status ErrnoError(int err, const std::string& path, absl::string_view what) {
  return absl::ErrnoToStatus(err, absl::StrCat(path, ": ", what));
}

// Reads a JSON value that must be a non-negative integer fitting in int64 (the largest a tensor size can be).
std::optional<uint64_t> NonNegativeInt(const nlohmann::json& value) {
  if (!value.is_number_unsigned()) return std::nullopt;  // negative ints are number_integer, floats are rejected
  uint64_t v = value.get<uint64_t>();
  if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
  return v;
}

// Parses and validates one tensor entry of the header, except for its place among the other tensors.
absl::StatusOr<SafetensorsEntry> ParseEntry(const std::string& path, const std::string& name,
                                            const nlohmann::json& value, uint64_t data_size) {
  if (!value.is_object())
    return TensorError(path, name, absl::StrCat("entry is a JSON ", value.type_name(), ", not an object"));

  SafetensorsEntry entry;
  entry.name = name;

  auto dtype_it = value.find("dtype");
  if (dtype_it == value.end()) return TensorError(path, name, "missing \"dtype\"");
  if (!dtype_it->is_string()) return TensorError(path, name, "\"dtype\" is not a string");
  const std::string& dtype_name = dtype_it->get_ref<const std::string&>();
  const DtypeInfo* dtype = FindDtype(dtype_name);
  if (dtype == nullptr)
    return TensorError(path, name, absl::StrCat("unknown dtype \"", absl::CEscape(dtype_name), "\""));
  entry.dtype = dtype->dtype;

  auto shape_it = value.find("shape");
  if (shape_it == value.end()) return TensorError(path, name, "missing \"shape\"");
  if (!shape_it->is_array()) return TensorError(path, name, "\"shape\" is not an array");
  // The product of the non-zero dimensions must fit in int64 whatever their order, so that neither our byte count
  // nor LibTorch's stride computation can overflow.
  int64_t numel = 1;
  int64_t nonzero_product = 1;
  entry.shape.reserve(shape_it->size());
  for (const nlohmann::json& dim_json : *shape_it) {
    std::optional<uint64_t> dim = NonNegativeInt(dim_json);
    if (!dim.has_value()) {
      return TensorError(path, name,
                         absl::StrCat("shape ", shape_it->dump(), " dimension ", entry.shape.size(), " is ",
                                      dim_json.dump(), ", not a non-negative 64-bit integer"));
    }
    int64_t d = static_cast<int64_t>(*dim);
    entry.shape.push_back(d);
    if (d != 0 && __builtin_mul_overflow(nonzero_product, d, &nonzero_product)) {
      return TensorError(path, name,
                         absl::StrCat("shape ", shape_it->dump(), " has more elements than fit in 64 bits"));
    }
    numel = d == 0 ? 0 : numel * d;  // cannot overflow: |numel| <= nonzero_product
  }
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(numel), dtype->itemsize, &nbytes) ||
      nbytes > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return TensorError(
        path, name,
        absl::StrCat("shape ", ShapeString(entry.shape), " of ", dtype->name, " needs more bytes than fit in 63 bits"));
  }

  auto offsets_it = value.find("data_offsets");
  if (offsets_it == value.end()) return TensorError(path, name, "missing \"data_offsets\"");
  if (!offsets_it->is_array() || offsets_it->size() != 2) {
    return TensorError(path, name,
                       absl::StrCat("data_offsets ", offsets_it->dump(), " is not an array of two integers"));
  }
  std::optional<uint64_t> begin = NonNegativeInt((*offsets_it)[0]);
  std::optional<uint64_t> end = NonNegativeInt((*offsets_it)[1]);
  if (!begin.has_value() || !end.has_value()) {
    return TensorError(path, name,
                       absl::StrCat("data_offsets ", offsets_it->dump(), " are not two non-negative integers"));
  }
  if (*begin > *end) {
    return TensorError(path, name, absl::StrCat("data_offsets [", *begin, ", ", *end, "] begin after they end"));
  }
  if (*end > data_size) {
    return TensorError(
        path, name,
        absl::StrCat("data_offsets [", *begin, ", ", *end, "] end past the data region of ", data_size, " bytes"));
  }
  if (*end - *begin != nbytes) {
    return TensorError(path, name,
                       absl::StrCat("data_offsets [", *begin, ", ", *end, "] hold ", *end - *begin, " bytes but shape ",
                                    ShapeString(entry.shape), " of ", dtype->name, " needs ", nbytes));
  }
  entry.begin = *begin;
  entry.end = *end;
  return entry;
}

// Writes all of `data` to `fd`, retrying on EINTR and short writes. Returns 0 or an errno value.
int WriteAll(int fd, absl::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return 0;
}

}  // namespace

absl::Status SafetensorsFile::Parse(const uint8_t* base, uint64_t size, const Options& options) {
  if (size < kHeaderLengthBytes) {
    return FileError(path_, absl::StrCat("file is ", size, " bytes, too short for the 8-byte header length"));
  }
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | base[i];
  if (header_size == 0) return FileError(path_, "header length is 0");
  if (header_size > options.max_header_bytes) {
    return FileError(path_, absl::StrCat("header length ", header_size, " exceeds the limit of ",
                                         options.max_header_bytes, " bytes"));
  }
  if (header_size > size - kHeaderLengthBytes) {
    return FileError(path_, absl::StrCat("header length ", header_size, " runs past the end of the file (",
                                         size - kHeaderLengthBytes, " bytes after the length)"));
  }
  data_ = base + kHeaderLengthBytes + header_size;
  data_size_ = size - kHeaderLengthBytes - header_size;

  const char* header_begin = reinterpret_cast<const char*>(base + kHeaderLengthBytes);
  nlohmann::json header =
      nlohmann::json::parse(header_begin, header_begin + header_size, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) return FileError(path_, "header is not valid JSON");
  if (!header.is_object()) {
    return FileError(path_, absl::StrCat("header is a JSON ", header.type_name(), ", not an object"));
  }
  // nlohmann stops at a NUL byte and skips a byte-order mark or leading spaces; the format allows none of them
  // (only trailing spaces, as padding).
  if (header_begin[0] != '{') return FileError(path_, "header does not start with '{'");
  if (std::memchr(header_begin, '\0', header_size) != nullptr) return FileError(path_, "header contains a NUL byte");

  std::vector<const SafetensorsEntry*> by_offset;
  by_offset.reserve(header.size());
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == kMetadataKey) {
      if (!it->is_object()) return FileError(path_, "\"__metadata__\" is not an object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) {
          return FileError(path_, absl::StrCat("\"__metadata__\" value of ", Quote(m.key()), " is a JSON ",
                                               m->type_name(), ", not a string"));
        }
        metadata_.emplace(m.key(), m->get<std::string>());
      }
      continue;
    }
    DS_ASSIGN_OR_RETURN(SafetensorsEntry entry, ParseEntry(path_, name, *it, data_size_));
    auto [pos, inserted] = entries_.emplace(name, std::move(entry));
    by_offset.push_back(&pos->second);
  }

  // The tensors must tile the data region exactly: no overlap, no hole, nothing after the last one.
  std::sort(by_offset.begin(), by_offset.end(), [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
    return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
  });
  uint64_t expected = 0;
  const SafetensorsEntry* previous = nullptr;
  for (const SafetensorsEntry* e : by_offset) {
    if (e->begin < expected) {
      return TensorError(path_, e->name,
                         absl::StrCat("data_offsets [", e->begin, ", ", e->end, "] overlap tensor ",
                                      Quote(previous->name), " at [", previous->begin, ", ", previous->end, "]"));
    }
    if (e->begin > expected) {
      return TensorError(
          path_, e->name,
          absl::StrCat("data_offsets [", e->begin, ", ", e->end, "] leave a hole of ", e->begin - expected,
                       " bytes at [", expected, ", ", e->begin, ") in the data region"));
    }
    expected = e->end;
    previous = e;
    order_.push_back(e->name);
  }
  if (expected != data_size_) {
    return FileError(path_,
                     absl::StrCat("data region is ", data_size_, " bytes but the tensors cover only ", expected,
                                  "; bytes [", expected, ", ", data_size_, ") belong to no tensor"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path,
                                                                       const Options& options) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;

  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, path, "cannot open safetensors file");
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return ErrnoError(err, path, "cannot stat safetensors file");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return FileError(path, "not a regular file");
  }
  uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < kHeaderLengthBytes) {
    ::close(fd);
    return FileError(path, absl::StrCat("file is ", file_size, " bytes, too short for the 8-byte header length"));
  }
  void* map = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) return ErrnoError(map_errno, path, "cannot mmap safetensors file");
  file->map_ = map;
  file->map_size_ = file_size;  // from here on the destructor unmaps

  DS_RETURN_IF_ERROR(file->Parse(static_cast<const uint8_t*>(map), file_size, options));
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBuffer(std::string bytes,
                                                                             const Options& options,
                                                                             absl::string_view display_name) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = std::string(display_name);
  file->buffer_ = std::move(bytes);  // the object is on the heap and never moves: data pointers stay valid
  DS_RETURN_IF_ERROR(file->Parse(reinterpret_cast<const uint8_t*>(file->buffer_.data()), file->buffer_.size(),
                                 options));
  return file;
}

std::vector<std::string> SafetensorsFile::names() const { return order_; }

bool SafetensorsFile::contains(absl::string_view name) const { return entries_.find(name) != entries_.end(); }

absl::StatusOr<SafetensorsEntry> SafetensorsFile::entry(absl::string_view name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) return absl::NotFoundError(absl::StrCat(path_, ": no tensor ", Quote(name)));
  return it->second;
}

absl::StatusOr<absl::string_view> SafetensorsFile::bytes(absl::string_view name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) return absl::NotFoundError(absl::StrCat(path_, ": no tensor ", Quote(name)));
  const SafetensorsEntry& e = it->second;
  return absl::string_view(reinterpret_cast<const char*>(data_ + e.begin), e.end - e.begin);
}

absl::StatusOr<at::Tensor> SafetensorsFile::View(absl::string_view name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) return absl::NotFoundError(absl::StrCat(path_, ": no tensor ", Quote(name)));
  const SafetensorsEntry& e = it->second;
  std::optional<c10::ScalarType> type = ToScalarType(e.dtype);
  if (!type.has_value()) {
    return absl::UnimplementedError(
        absl::StrCat(path_, ": tensor ", Quote(name), ": dtype ", Info(e.dtype).name,
                     " cannot be materialised as at::Tensor (only F32, F16, BF16, I64, I32)"));
  }
  const uint8_t* src = data_ + e.begin;
  const uint64_t itemsize = Info(e.dtype).itemsize;
  if (reinterpret_cast<uintptr_t>(src) % itemsize == 0) {
    // The mapping is PROT_READ: the tensor must never be written to (doing so faults). from_blob wants a non-const
    // pointer only because at::Tensor has no read-only flag.
    void* data = const_cast<uint8_t*>(src);
    return TorchCall([&] { return at::from_blob(data, e.shape, at::TensorOptions().dtype(*type)); },
                     absl::StrCat(path_, ": view of tensor ", Quote(name)));
  }
  // Misaligned for its type (a header whose length is not a multiple of 8, or odd-sized tensors before this one):
  // reading through a misaligned pointer is undefined, so hand out an aligned copy instead.
  DS_ASSIGN_OR_RETURN(at::Tensor copy, TorchCall([&] { return at::empty(e.shape, at::TensorOptions().dtype(*type)); },
                                                 absl::StrCat(path_, ": aligned copy of tensor ", Quote(name))));
  if (e.end > e.begin) std::memcpy(copy.data_ptr(), src, e.end - e.begin);
  return copy;
}

absl::StatusOr<at::Tensor> SafetensorsFile::Load(absl::string_view name, c10::ScalarType dtype) const {
  if (!c10::isFloatingType(dtype) && !c10::isIntegralType(dtype, /*includeBool=*/true)) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor ", Quote(name), ": cannot load as ",
                                                   c10::toString(dtype), " (not a real or integral dtype)"));
  }
  DS_ASSIGN_OR_RETURN(at::Tensor view, View(name));
  // copy=true: an owned tensor even when the dtype already matches.
  return TorchCall([&] { return view.to(dtype, /*non_blocking=*/false, /*copy=*/true).contiguous(); },
                   absl::StrCat(path_, ": load of tensor ", Quote(name), " as ", c10::toString(dtype)));
}

absl::StatusOr<std::string> SerializeSafetensors(const std::map<std::string, at::Tensor>& tensors,
                                                 const std::map<std::string, std::string>& metadata) {
  struct Prepared {
    const std::string* name;
    SafetensorsDtype dtype;
    at::Tensor tensor;  // contiguous, CPU
    uint64_t nbytes;
  };
  std::vector<Prepared> prepared;
  prepared.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) {
    if (name == kMetadataKey) {
      return absl::InvalidArgumentError("safetensors: \"__metadata__\" is reserved and cannot name a tensor");
    }
    if (!tensor.defined()) {
      return absl::InvalidArgumentError(absl::StrCat("safetensors: tensor ", Quote(name), " is undefined"));
    }
    std::optional<SafetensorsDtype> dtype = FromScalarType(tensor.scalar_type());
    if (!dtype.has_value()) {
      return absl::InvalidArgumentError(absl::StrCat("safetensors: tensor ", Quote(name), " has dtype ",
                                                     c10::toString(tensor.scalar_type()),
                                                     "; only F32, F16, BF16, I64, I32 can be written"));
    }
    DS_ASSIGN_OR_RETURN(at::Tensor cpu, TorchCall([&t = tensor] { return t.cpu().contiguous(); },
                                                  absl::StrCat("safetensors: contiguous CPU copy of ", Quote(name))));
    const uint64_t nbytes = cpu.nbytes();
    prepared.push_back(Prepared{&name, *dtype, std::move(cpu), nbytes});
  }

  // Data order: larger items first, then by name (the reference implementation also puts larger items first), so that
  // every tensor starts aligned for its type; the header's JSON keys stay in name order.
  std::vector<const Prepared*> data_order;
  data_order.reserve(prepared.size());
  for (const Prepared& p : prepared) data_order.push_back(&p);
  std::stable_sort(data_order.begin(), data_order.end(), [](const Prepared* a, const Prepared* b) {
    return Info(a->dtype).itemsize > Info(b->dtype).itemsize;  // stable: ties stay in name order
  });
  std::map<const std::string*, std::pair<uint64_t, uint64_t>> offsets;
  uint64_t data_size = 0;
  for (const Prepared* p : data_order) {
    offsets[p->name] = {data_size, data_size + p->nbytes};
    data_size += p->nbytes;
  }

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header[std::string(kMetadataKey)] = std::move(meta);
  }
  for (const Prepared& p : prepared) {
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = std::string(Info(p.dtype).name);
    nlohmann::ordered_json shape = nlohmann::ordered_json::array();
    for (int64_t d : p.tensor.sizes()) shape.push_back(d);
    entry["shape"] = std::move(shape);
    const auto& [begin, end] = offsets[p.name];
    entry["data_offsets"] = nlohmann::ordered_json::array({begin, end});
    header[*p.name] = std::move(entry);
  }
  std::string header_text;
  try {
    header_text = header.dump();  // compact: no spaces
  } catch (const nlohmann::json::exception& e) {
    // The only way dump() fails is invalid UTF-8 in a tensor name or in the metadata.
    return absl::InvalidArgumentError(absl::StrCat("safetensors: cannot write header: ", e.what()));
  }
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  std::string out;
  out.reserve(kHeaderLengthBytes + header_text.size() + data_size);
  uint64_t header_size = header_text.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((header_size >> (8 * i)) & 0xff));
  out.append(header_text);
  for (const Prepared* p : data_order) {
    if (p->nbytes > 0) out.append(static_cast<const char*>(p->tensor.data_ptr()), p->nbytes);
  }
  return out;
}

absl::Status WriteSafetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  DS_ASSIGN_OR_RETURN(std::string bytes, SerializeSafetensors(tensors, metadata));

  // pid and a per-process counter: concurrent writers (processes or threads) never share a temporary file.
  static std::atomic<uint64_t> counter{0};
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid(), ".", counter.fetch_add(1));
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError(errno, tmp, absl::StrCat("cannot create temporary file for ", path));
  int err = WriteAll(fd, bytes);
  absl::string_view failed = "write";
  if (err == 0 && ::fsync(fd) != 0) {
    err = errno;
    failed = "fsync";
  }
  if (::close(fd) != 0 && err == 0) {
    err = errno;
    failed = "close";
  }
  if (err == 0 && ::rename(tmp.c_str(), path.c_str()) != 0) {
    err = errno;
    failed = "rename into place";
  }
  if (err != 0) {
    ::unlink(tmp.c_str());
    return ErrnoError(err, path, absl::StrCat(failed, " of ", tmp, " failed"));
  }
  // Make the rename itself durable; failing to sync the directory does not undo a complete write.
  std::string::size_type slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
  return absl::OkStatus();
}

}  // namespace model
}  // namespace deltaserve
