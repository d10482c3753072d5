#include "server/model/safetensors.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <dirent.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace deltaserve {
namespace model {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string LengthPrefix(uint64_t n) {
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  return out;
}

// A safetensors file from a header (used verbatim, no padding) and a data region.
std::string MakeFile(const std::string& header, const std::string& data = "") {
  return LengthPrefix(header.size()) + header + data;
}

// Same, with the header padded with spaces to a multiple of 8 bytes so the data region is 8-aligned.
std::string MakeAlignedFile(std::string header, const std::string& data = "") {
  header.append((8 - header.size() % 8) % 8, ' ');
  return MakeFile(header, data);
}

std::string Floats(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "safetensors_test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr) << tmpl;
    dir_ = tmpl;
  }
  void TearDown() override {
    // Only files this test wrote; nothing recursive.
    for (const std::string& f : written_) ::unlink(f.c_str());
    ::rmdir(dir_.c_str());
  }

  std::string Path(const std::string& name) {
    std::string path = dir_ + "/" + name;
    written_.push_back(path);
    return path;
  }

  std::string Write(const std::string& bytes, const std::string& name = "model.safetensors") {
    std::string path = Path(name);
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    EXPECT_TRUE(out.good());
    return path;
  }

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> OpenBytes(const std::string& bytes,
                                                             const SafetensorsFile::Options& options = {}) {
    return SafetensorsFile::Open(Write(bytes), options);
  }

  // Asserts that opening `bytes` fails with INVALID_ARGUMENT and a message naming the file and `needle`.
  void ExpectInvalid(const std::string& bytes, const std::string& needle,
                     const SafetensorsFile::Options& options = {}) {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = OpenBytes(bytes, options);
    ASSERT_FALSE(file.ok());
    EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
    EXPECT_THAT(std::string(file.status().message()), HasSubstr("model.safetensors"));
    EXPECT_THAT(std::string(file.status().message()), HasSubstr(needle));
  }

  std::string dir_;
  std::vector<std::string> written_;
};

TEST_F(SafetensorsTest, RoundTripsF32F16Bf16I64) {
  std::map<std::string, at::Tensor> tensors = {
      {"f32", at::randn({3, 4})},
      {"f16", at::randn({5}).to(at::kHalf)},
      {"bf16", at::randn({2, 3, 2}).to(at::kBFloat16)},
      {"i64", at::arange(-3, 7, at::kLong)},
      {"i32", at::arange(0, 6, at::kInt).reshape({2, 3})},
  };
  std::string path = Path("rt.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, tensors).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->metadata().empty());
  for (const auto& [name, expected] : tensors) {
    absl::StatusOr<at::Tensor> view = (*file)->View(name);
    ASSERT_TRUE(view.ok()) << view.status();
    EXPECT_EQ(view->scalar_type(), expected.scalar_type()) << name;
    EXPECT_EQ(view->sizes(), expected.sizes()) << name;
    EXPECT_TRUE(view->equal(expected)) << name;
    // The writer lays data out so that every tensor is aligned for its type, hence viewed without a copy.
    absl::StatusOr<absl::string_view> raw = (*file)->bytes(name);
    ASSERT_TRUE(raw.ok());
    EXPECT_EQ(view->data_ptr(), static_cast<const void*>(raw->data())) << name;
  }
  EXPECT_FALSE((*file)->contains("missing"));
  EXPECT_TRUE((*file)->contains("bf16"));
}

TEST_F(SafetensorsTest, WritesNonContiguousTensorsAsContiguous) {
  at::Tensor base = at::arange(0, 12, at::kFloat).reshape({3, 4});
  at::Tensor transposed = base.t();
  ASSERT_FALSE(transposed.is_contiguous());
  std::string path = Path("t.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"t", transposed}}).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<at::Tensor> view = (*file)->View("t");
  ASSERT_TRUE(view.ok());
  EXPECT_TRUE(view->equal(transposed));
}

TEST_F(SafetensorsTest, SerializationIsDeterministic) {
  std::map<std::string, at::Tensor> tensors = {
      {"b", at::full({2}, 1.5, at::kFloat)},
      {"a", at::full({1}, 7, at::kLong)},
      {"c", at::full({3}, 2.0, at::kHalf)},
  };
  absl::StatusOr<std::string> first = SerializeSafetensors(tensors, {{"format", "pt"}});
  absl::StatusOr<std::string> second = SerializeSafetensors(tensors, {{"format", "pt"}});
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(*first, *second);

  // Exact layout: sorted compact header, metadata first, space padding to 8 bytes, data by item size then name.
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"c":{"dtype":"F16","shape":[3],"data_offsets":[16,22]}})";
  std::string padded = header + std::string((8 - header.size() % 8) % 8, ' ');
  ASSERT_EQ(first->size(), 8 + padded.size() + 22);
  EXPECT_EQ(first->substr(0, 8), LengthPrefix(padded.size()));
  EXPECT_EQ(first->substr(8, padded.size()), padded);
  int64_t seven;
  std::memcpy(&seven, first->data() + 8 + padded.size(), 8);
  EXPECT_EQ(seven, 7);
}

TEST_F(SafetensorsTest, SerializationOmitsEmptyMetadata) {
  absl::StatusOr<std::string> bytes = SerializeSafetensors({{"x", at::zeros({1}, at::kInt)}});
  ASSERT_TRUE(bytes.ok());
  const std::string header = R"({"x":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})";
  EXPECT_EQ(bytes->substr(8, header.size()), header);
  EXPECT_EQ(bytes->find("__metadata__"), std::string::npos);
}

TEST_F(SafetensorsTest, WriterRejectsUnsupportedDtype) {
  absl::StatusOr<std::string> bytes = SerializeSafetensors({{"d", at::zeros({2}, at::kDouble)}});
  ASSERT_FALSE(bytes.ok());
  EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bytes.status().message()), HasSubstr("'d'"));
  EXPECT_THAT(std::string(bytes.status().message()), HasSubstr("Double"));
}

TEST_F(SafetensorsTest, WriterRejectsReservedAndUndefined) {
  EXPECT_EQ(SerializeSafetensors({{"__metadata__", at::zeros({1})}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SerializeSafetensors({{"u", at::Tensor()}}).status().code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<std::string> bad_utf8 = SerializeSafetensors({{"bad\xff", at::zeros({1})}});
  EXPECT_EQ(bad_utf8.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SafetensorsTest, WriteReportsMissingDirectory) {
  std::string path = dir_ + "/no/such/dir/x.safetensors";
  absl::Status status = WriteSafetensors(path, {{"x", at::zeros({1})}});
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr(path));
  EXPECT_THAT(std::string(status.message()), HasSubstr(std::strerror(ENOENT)));
}

TEST_F(SafetensorsTest, WriteReplacesExistingFileAndLeavesNoTemporary) {
  std::string path = Write("old contents", "replace.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"x", at::full({2}, 3.0)}}).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_THAT((*file)->names(), ElementsAre("x"));
  // No temporary file is left next to the target.
  std::vector<std::string> entries;
  DIR* dir = ::opendir(dir_.c_str());
  ASSERT_NE(dir, nullptr);
  while (struct dirent* e = ::readdir(dir)) {
    std::string name = e->d_name;
    if (name != "." && name != "..") entries.push_back(name);
  }
  ::closedir(dir);
  EXPECT_THAT(entries, ElementsAre("replace.safetensors"));
}

TEST_F(SafetensorsTest, ViewIsZeroCopy) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      OpenBytes(MakeAlignedFile(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})", Floats({1, 2, 3, 4})));
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<at::Tensor> view = (*file)->View("w");
  ASSERT_TRUE(view.ok()) << view.status();
  absl::StatusOr<absl::string_view> raw = (*file)->bytes("w");
  ASSERT_TRUE(raw.ok());
  EXPECT_EQ(view->data_ptr(), static_cast<const void*>(raw->data()));
  EXPECT_EQ(view->scalar_type(), at::kFloat);
  EXPECT_EQ(view->sizes(), (std::vector<int64_t>{2, 2}));
  EXPECT_FLOAT_EQ(view->data_ptr<float>()[3], 4.0f);

  absl::StatusOr<at::Tensor> loaded = (*file)->Load("w", at::kFloat);
  ASSERT_TRUE(loaded.ok());
  EXPECT_NE(loaded->data_ptr(), view->data_ptr());  // Load copies even when the dtype matches
  EXPECT_TRUE(loaded->equal(*view));
  EXPECT_TRUE(loaded->is_contiguous());
}

TEST_F(SafetensorsTest, LoadConvertsBf16ToF32Exactly) {
  const std::vector<uint16_t> bits = {0x3F80, 0xC000, 0x3FC0, 0x3F81, 0x7F80, 0x0001, 0x8000, 0x4049};
  std::string data(reinterpret_cast<const char*>(bits.data()), bits.size() * 2);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      OpenBytes(MakeAlignedFile(R"({"b":{"dtype":"BF16","shape":[8],"data_offsets":[0,16]}})", data));
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<at::Tensor> loaded = (*file)->Load("b", at::kFloat);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(loaded->scalar_type(), at::kFloat);
  ASSERT_EQ(loaded->numel(), 8);
  for (size_t i = 0; i < bits.size(); ++i) {
    uint32_t expected_bits = static_cast<uint32_t>(bits[i]) << 16;
    uint32_t got_bits;
    std::memcpy(&got_bits, loaded->data_ptr<float>() + i, 4);
    EXPECT_EQ(got_bits, expected_bits) << i;
  }
}

TEST_F(SafetensorsTest, LoadOfMissingTensorIsNotFound) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = OpenBytes(MakeAlignedFile("{}"));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->Load("nope", at::kFloat).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*file)->View("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*file)->entry("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*file)->bytes("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string((*file)->View("nope").status().message()), HasSubstr("'nope'"));
}

TEST_F(SafetensorsTest, ViewOfKnownButUnsupportedDtypeIsUnimplemented) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      OpenBytes(MakeAlignedFile(R"({"s":{"dtype":"I16","shape":[2],"data_offsets":[0,4]}})", std::string(4, '\0')));
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<at::Tensor> view = (*file)->View("s");
  EXPECT_EQ(view.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(view.status().message()), HasSubstr("I16"));
  EXPECT_EQ((*file)->Load("s", at::kFloat).status().code(), absl::StatusCode::kUnimplemented);
  absl::StatusOr<SafetensorsEntry> entry = (*file)->entry("s");
  ASSERT_TRUE(entry.ok());
  EXPECT_EQ(entry->dtype, SafetensorsDtype::kI16);
  EXPECT_THAT(entry->shape, ElementsAre(2));
}

TEST_F(SafetensorsTest, HandlesMisalignedOffsets) {
  // "a" takes one byte, so "b" (F32) starts at data offset 1: misaligned for float.
  std::string data = std::string(1, '\x2a') + Floats({1.25f, -2.5f});
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = OpenBytes(MakeAlignedFile(
      R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}})",
      data));
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<at::Tensor> view = (*file)->View("b");
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(view->data_ptr()) % alignof(float), 0u);
  EXPECT_FLOAT_EQ(view->data_ptr<float>()[0], 1.25f);
  EXPECT_FLOAT_EQ(view->data_ptr<float>()[1], -2.5f);
  absl::StatusOr<at::Tensor> loaded = (*file)->Load("b", at::kDouble);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_DOUBLE_EQ(loaded->data_ptr<double>()[1], -2.5);

  // A header whose length is not a multiple of 8 misaligns the whole data region.
  std::string header = R"({"c":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})";
  header.append((8 - header.size() % 8) % 8 + 3, ' ');
  int64_t v = -123456789012345;
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> odd =
      OpenBytes(MakeFile(header, std::string(reinterpret_cast<const char*>(&v), 8)));
  ASSERT_TRUE(odd.ok()) << odd.status();
  absl::StatusOr<at::Tensor> c = (*odd)->View("c");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->data_ptr<int64_t>()[0], v);
}

TEST_F(SafetensorsTest, ReadsMetadata) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      OpenBytes(MakeAlignedFile(R"({"__metadata__":{"format":"pt","base":"use-lite"},"x":{"dtype":"I32","shape":[],)"
                                R"("data_offsets":[0,4]}})",
                                std::string("\x05\0\0\0", 4)));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"base", "use-lite"}}));
  EXPECT_THAT((*file)->names(), ElementsAre("x"));  // "__metadata__" is not a tensor
  absl::StatusOr<at::Tensor> x = (*file)->View("x");
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(x->dim(), 0);
  EXPECT_EQ(x->item<int32_t>(), 5);

  // And through the writer.
  std::string path = Path("meta.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"y", at::zeros({1})}}, {{"k", "v"}}).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> written = SafetensorsFile::Open(path);
  ASSERT_TRUE(written.ok()) << written.status();
  EXPECT_EQ((*written)->metadata(), (std::map<std::string, std::string>{{"k", "v"}}));
}

TEST_F(SafetensorsTest, EmptyTensorIsAllowed) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = OpenBytes(MakeAlignedFile(
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"e":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]}})",
      Floats({9})));
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<at::Tensor> e = (*file)->View("e");
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->sizes(), (std::vector<int64_t>{0, 3}));
  absl::StatusOr<at::Tensor> loaded = (*file)->Load("e", at::kBFloat16);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->numel(), 0);

  // A file with no tensors at all, and the writer with an empty tensor.
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> none = OpenBytes(MakeAlignedFile("{}"));
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE((*none)->names().empty());
  std::string path = Path("empty.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"z", at::zeros({0}, at::kHalf)}}).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> written = SafetensorsFile::Open(path);
  ASSERT_TRUE(written.ok()) << written.status();
  EXPECT_EQ((*written)->View("z")->numel(), 0);
}

TEST_F(SafetensorsTest, NamesAreInFileOrder) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = OpenBytes(MakeAlignedFile(
      R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},"b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})",
      "xyz"));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_THAT((*file)->names(), ElementsAre("b", "a"));
  EXPECT_EQ(*(*file)->bytes("a"), "z");
  absl::StatusOr<SafetensorsEntry> a = (*file)->entry("a");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->begin, 2u);
  EXPECT_EQ(a->end, 3u);
  EXPECT_EQ(a->dtype, SafetensorsDtype::kU8);
}

TEST_F(SafetensorsTest, ReportsMissingFileAsNotFound) {
  std::string path = dir_ + "/absent.safetensors";
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr(path));
}

TEST_F(SafetensorsTest, RejectsDirectory) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(dir_);
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SafetensorsTest, RejectsTruncatedFile) {
  ExpectInvalid("", "too short");
  ExpectInvalid(std::string(7, '\0'), "too short");
  // A valid file cut inside its data region leaves the last tensor past the end.
  std::string full = MakeAlignedFile(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", Floats({1, 2}));
  ExpectInvalid(full.substr(0, full.size() - 3), "'w'");
}

TEST_F(SafetensorsTest, RejectsZeroHeaderLength) { ExpectInvalid(LengthPrefix(0) + "{}", "header length is 0"); }

TEST_F(SafetensorsTest, RejectsHeaderLengthPastEndOfFile) {
  ExpectInvalid(LengthPrefix(100) + "{}", "past the end of the file");
}

TEST_F(SafetensorsTest, RejectsHugeHeaderLength) {
  ExpectInvalid(LengthPrefix(~0ull) + "{}", "exceeds the limit");
  SafetensorsFile::Options small;
  small.max_header_bytes = 8;
  ExpectInvalid(MakeAlignedFile(R"({"__metadata__":{}})"), "exceeds the limit of 8 bytes", small);
}

TEST_F(SafetensorsTest, RejectsInvalidJson) {
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":"F32",)"), "not valid JSON");
  ExpectInvalid(MakeFile(std::string("{}\0junk", 7)), "NUL byte");
  ExpectInvalid(MakeFile(" {}"), "does not start with '{'");
  ExpectInvalid(MakeFile("\xef\xbb\xbf{}"), "does not start with '{'");
}

TEST_F(SafetensorsTest, RejectsNonObjectHeader) {
  ExpectInvalid(MakeAlignedFile("[1,2,3]"), "header is a JSON array, not an object");
  ExpectInvalid(MakeAlignedFile("42"), "not an object");
}

TEST_F(SafetensorsTest, RejectsNonObjectEntry) {
  ExpectInvalid(MakeAlignedFile(R"({"w":[1,2]})"), "tensor 'w': entry is a JSON array");
}

TEST_F(SafetensorsTest, RejectsUnknownDtype) {
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}})", std::string(16, 'x')),
                "tensor 'w': unknown dtype \"F128\"");
}

TEST_F(SafetensorsTest, RejectsMissingOrMistypedFields) {
  ExpectInvalid(MakeAlignedFile(R"({"w":{"shape":[1],"data_offsets":[0,4]}})", "abcd"), "'w': missing \"dtype\"");
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", "abcd"), "not a string");
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", "abcd"), "'w': missing \"shape\"");
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":"F32","shape":1,"data_offsets":[0,4]}})", "abcd"),
                "\"shape\" is not an array");
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", "abcd"),
                "not a non-negative 64-bit integer");
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":"F32","shape":[1]}})", "abcd"), "'w': missing \"data_offsets\"");
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", "abcd"),
                "not an array of two integers");
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-1,4]}})", "abcd"),
                "not two non-negative integers");
}

TEST_F(SafetensorsTest, RejectsNegativeShape) {
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":"F32","shape":[2,-1],"data_offsets":[0,0]}})"),
                "tensor 'w': shape [2,-1] dimension 1 is -1");
}

TEST_F(SafetensorsTest, RejectsShapeProductOverflow) {
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,0]}})"),
                "tensor 'w': shape [4294967296,4294967296,4] has more elements than fit in 64 bits");
  // Elements fit but bytes do not.
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})"),
                "needs more bytes than fit");
  // A zero dimension does not excuse an overflowing product of the others.
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":"U8","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}})"),
                "has more elements than fit in 64 bits");
}

TEST_F(SafetensorsTest, RejectsShapeThatDoesNotMatchOffsets) {
  ExpectInvalid(
      MakeAlignedFile(R"({"x.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,12]}})", std::string(12, '\0')),
      "tensor 'x.weight': data_offsets [0, 12] hold 12 bytes but shape [2,3] of F32 needs 24");
}

TEST_F(SafetensorsTest, RejectsBadOffsets) {
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}})", "abcd"),
                "tensor 'w': data_offsets [4, 2] begin after they end");
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}})", "abcd"),
                "tensor 'w': data_offsets [0, 8] end past the data region of 4 bytes");
  ExpectInvalid(MakeAlignedFile(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551615]}})", "a"),
                "not two non-negative integers");
}

TEST_F(SafetensorsTest, RejectsOverlappingTensors) {
  ExpectInvalid(MakeAlignedFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                Floats({1, 2})),
                "tensor 'b': data_offsets [4, 8] overlap tensor 'a'");
  // An empty tensor inside another one overlaps it too.
  ExpectInvalid(MakeAlignedFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                                Floats({1, 2})),
                "tensor 'e': data_offsets [4, 4] overlap tensor 'a'");
}

TEST_F(SafetensorsTest, RejectsHoleInDataRegion) {
  ExpectInvalid(MakeAlignedFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                                Floats({1, 2, 3})),
                "tensor 'b': data_offsets [8, 12] leave a hole of 4 bytes at [4, 8)");
  ExpectInvalid(MakeAlignedFile(R"({"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", Floats({1, 2})),
                "tensor 'b': data_offsets [4, 8] leave a hole of 4 bytes at [0, 4)");
  // Trailing bytes after the last tensor.
  ExpectInvalid(MakeAlignedFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", Floats({1, 2})),
                "bytes [4, 8) belong to no tensor");
  ExpectInvalid(MakeAlignedFile("{}", "x"), "bytes [0, 1) belong to no tensor");
}

TEST_F(SafetensorsTest, RejectsBadMetadata) {
  ExpectInvalid(MakeAlignedFile(R"({"__metadata__":[1]})"), "\"__metadata__\" is not an object");
  ExpectInvalid(MakeAlignedFile(R"({"__metadata__":{"n":1}})"), "\"__metadata__\" value of 'n' is a JSON number");
}

// Every prefix and every single-byte corruption of a valid file either opens or fails cleanly.
TEST_F(SafetensorsTest, SurvivesEveryTruncationAndByteFlip) {
  absl::StatusOr<std::string> valid = SerializeSafetensors(
      {{"a", at::arange(0, 3, at::kFloat)}, {"b", at::arange(0, 2, at::kLong)}, {"c", at::zeros({3}, at::kHalf)}},
      {{"k", "v"}});
  ASSERT_TRUE(valid.ok());
  for (size_t n = 0; n < valid->size(); ++n) {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = OpenBytes(valid->substr(0, n));
    EXPECT_FALSE(file.ok()) << n;
  }
  for (size_t i = 0; i < valid->size(); ++i) {
    for (unsigned char x : {0x01, 0x20, 0x80, 0xff}) {
      std::string corrupt = *valid;
      corrupt[i] = static_cast<char>(corrupt[i] ^ x);
      absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = OpenBytes(corrupt);
      if (!file.ok()) {
        EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << i << " " << file.status();
        continue;
      }
      for (const std::string& name : (*file)->names()) {
        absl::StatusOr<at::Tensor> t = (*file)->Load(name, at::kFloat);
        if (t.ok()) {
          EXPECT_GE(t->numel(), 0);
        }
      }
    }
  }
}

TEST_F(SafetensorsTest, FromBufferReadsWhatTheWriterWrote) {
  at::Tensor a = at::randn({3, 4});
  at::Tensor b = at::arange(0, 5, at::kLong);
  absl::StatusOr<std::string> bytes = SerializeSafetensors({{"a", a}, {"b", b}}, {{"k", "v"}});
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::FromBuffer(*bytes, SafetensorsFile::Options(), "pack");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->path(), "pack");
  EXPECT_EQ((*file)->metadata(), (std::map<std::string, std::string>{{"k", "v"}}));
  EXPECT_THAT((*file)->names(), ElementsAre("b", "a"));  // file order: 8-byte items first
  absl::StatusOr<at::Tensor> va = (*file)->View("a");
  ASSERT_TRUE(va.ok()) << va.status();
  EXPECT_TRUE(va->equal(a));
  absl::StatusOr<at::Tensor> lb = (*file)->Load("b", at::kLong);
  ASSERT_TRUE(lb.ok()) << lb.status();
  EXPECT_TRUE(lb->equal(b));
  // Small buffers (short-string storage) too.
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> empty =
      SafetensorsFile::FromBuffer(MakeAlignedFile("{}"), SafetensorsFile::Options());
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE((*empty)->names().empty());
}

TEST_F(SafetensorsTest, FromBufferValidatesLikeOpen) {
  auto expect_invalid = [](const std::string& bytes, const std::string& needle,
                           const SafetensorsFile::Options& options = {}) {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::FromBuffer(bytes, options, "buf");
    ASSERT_FALSE(file.ok());
    EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
    EXPECT_THAT(std::string(file.status().message()), HasSubstr("buf: "));
    EXPECT_THAT(std::string(file.status().message()), HasSubstr(needle));
  };
  expect_invalid("", "too short");
  expect_invalid(LengthPrefix(0) + "{}", "header length is 0");
  expect_invalid(LengthPrefix(100) + "{}", "runs past the end");
  SafetensorsFile::Options small;
  small.max_header_bytes = 4;
  expect_invalid(MakeAlignedFile("{}      "), "exceeds the limit", small);
  expect_invalid(MakeAlignedFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", Floats({1})),
                 "tensor 'a'");
  expect_invalid(MakeAlignedFile("{}", "x"), "belong to no tensor");
  // Every truncation of a valid buffer fails cleanly.
  absl::StatusOr<std::string> valid = SerializeSafetensors({{"a", at::arange(0, 3, at::kFloat)}}, {{"k", "v"}});
  ASSERT_TRUE(valid.ok());
  for (size_t n = 0; n < valid->size(); ++n) {
    EXPECT_FALSE(SafetensorsFile::FromBuffer(valid->substr(0, n), SafetensorsFile::Options()).ok()) << n;
  }
}

}  // namespace
}  // namespace model
}  // namespace deltaserve
