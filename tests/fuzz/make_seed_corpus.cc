// Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/): valid inputs of every kind each
// parser reads, and a few malformed ones. Run it again after a format change; the output is deterministic.
//
//   cmake --build build --target make_seed_corpus && build/tests/fuzz/make_seed_corpus tests/fuzz/corpus
//
// Existing files of the same names are replaced; other files (crash reproducers) are kept. Not part of the
// default build (it is the only harness file that needs LibTorch's ops).
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "server/auth/tenants.h"
#include "server/common/sha256.h"
#include "server/delta/delta_pack.h"
#include "server/delta/peft.h"
#include "server/model/safetensors.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/fuzz/tiny_model.h"

namespace deltaserve {
namespace {

using delta::HeadSpec;
using delta::MethodKind;
using delta::MethodSpec;
using delta::PackContents;

std::string g_out;
int g_failures = 0;

void Write(const std::string& target, const std::string& name, const std::string& bytes) {
  const std::string dir = g_out + "/" + target;
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/" + name, std::ios::binary | std::ios::trunc) << bytes;
  std::printf("%s/%s: %zu bytes\n", target.c_str(), name.c_str(), bytes.size());
}

void Fail(const std::string& what, const absl::Status& status) {
  std::fprintf(stderr, "FAILED %s: %s\n", what.c_str(), status.ToString().c_str());
  ++g_failures;
}

at::Tensor Rand(std::vector<int64_t> shape, double scale, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.f, static_cast<float>(scale));
  at::Tensor out = at::empty(shape, at::kFloat);
  float* p = out.data_ptr<float>();
  for (int64_t i = 0; i < out.numel(); ++i) p[i] = dist(rng);
  return out;
}

const model::ModuleInfo& Module(const std::string& name) {
  for (const auto& m : fuzz::TinyBert().modules()) {
    if (m.name == name) return m;
  }
  std::fprintf(stderr, "no module %s\n", name.c_str());
  std::abort();
}

std::string Layer(int l, const std::string& rest) { return absl::StrCat("encoder.layer.", l, ".", rest); }

// --- delta packs ---

MethodSpec Lora() {
  MethodSpec s;
  s.kind = MethodKind::kLora;
  std::vector<std::string> targets;
  uint64_t seed = 1;
  for (int l = 0; l < 2; ++l) {
    for (const char* n : {"attention.self.query", "attention.self.value"}) {
      const model::ModuleInfo& m = Module(Layer(l, n));
      targets.push_back(m.name);
      s.tensors[m.name + ".lora_A"] = Rand({2, m.in_features}, 0.3, seed++);
      s.tensors[m.name + ".lora_B"] = Rand({m.out_features, 2}, 0.1, seed++);
    }
  }
  s.config = {{"rank", 2}, {"alpha", 4.0}, {"targets", targets}};
  return s;
}

MethodSpec BitFit() {
  MethodSpec s;
  s.kind = MethodKind::kBitFit;
  const model::ModuleInfo& m = Module(Layer(0, "intermediate.dense"));
  s.config = {{"targets", {m.name}}};
  s.tensors[m.name + ".bias"] = Rand({m.out_features}, 0.05, 10);
  return s;
}

MethodSpec LnTuning() {
  MethodSpec s;
  s.kind = MethodKind::kLnTuning;
  const model::ModuleInfo& m = Module(Layer(1, "output.LayerNorm"));
  s.config = {{"targets", {m.name}}};
  s.tensors[m.name + ".weight"] = Rand({m.in_features}, 0.1, 20);
  s.tensors[m.name + ".bias"] = Rand({m.in_features}, 0.1, 21);
  return s;
}

MethodSpec Ia3() {
  MethodSpec s;
  s.kind = MethodKind::kIa3;
  const model::ModuleInfo& k = Module(Layer(0, "attention.self.key"));
  const model::ModuleInfo& v = Module(Layer(0, "attention.self.value"));
  const model::ModuleInfo& ff = Module(Layer(0, "output.dense"));
  s.config = {{"targets", {k.name, v.name, ff.name}}, {"feedforward", {ff.name}}};
  s.tensors[k.name + ".ia3_l"] = Rand({k.out_features}, 0.1, 30).add(1);
  s.tensors[v.name + ".ia3_l"] = Rand({v.out_features}, 0.1, 31).add(1);
  s.tensors[ff.name + ".ia3_l"] = Rand({ff.in_features}, 0.1, 32).add(1);
  return s;
}

MethodSpec Adapter(MethodKind kind, const std::string& block, uint64_t seed) {
  MethodSpec s;
  s.kind = kind;
  const model::ModuleInfo& m = Module(block);
  const int64_t h = m.in_features, b = 4;
  s.config = {{"bottleneck", b}, {"targets", {block}}};
  if (kind == MethodKind::kAdapter) s.config["placement"] = "custom";
  s.tensors[block + ".down.weight"] = Rand({b, h}, 0.3, seed);
  s.tensors[block + ".down.bias"] = Rand({b}, 0.1, seed + 1);
  s.tensors[block + ".up.weight"] = Rand({h, b}, 0.3, seed + 2);
  s.tensors[block + ".up.bias"] = Rand({h}, 0.1, seed + 3);
  return s;
}

MethodSpec Prefix() {
  MethodSpec s;
  s.kind = MethodKind::kPrefix;
  std::vector<std::string> targets;
  uint64_t seed = 50;
  for (const auto& m : fuzz::TinyBert().modules()) {
    if (m.kind != model::ModuleKind::kAttention) continue;
    targets.push_back(m.name);
    s.tensors[m.name + ".prefix_keys"] = Rand({2, m.num_heads * m.head_dim}, 0.5, seed++);
    s.tensors[m.name + ".prefix_values"] = Rand({2, m.num_heads * m.head_dim}, 0.5, seed++);
  }
  s.config = {{"num_virtual_tokens", 2}, {"targets", targets}};
  return s;
}

MethodSpec Prompt() {
  MethodSpec s;
  s.kind = MethodKind::kPrompt;
  const int64_t e = Module("embeddings.word_embeddings").out_features;
  s.config = {{"num_virtual_tokens", 3}};
  s.tensors["prompt_embeddings"] = Rand({3, e}, 0.5, 60);
  return s;
}

HeadSpec Classifier() {
  const int64_t d = fuzz::TinyBert().info().embedding_dim;
  HeadSpec h;
  h.config = {{"type", "classification"}, {"labels", {"negative", "positive"}}, {"activation", "tanh"}};
  h.tensors["dense.weight"] = Rand({4, d}, 0.3, 70);
  h.tensors["dense.bias"] = Rand({4}, 0.1, 71);
  h.tensors["out.weight"] = Rand({2, 4}, 0.3, 72);
  h.tensors["out.bias"] = Rand({2}, 0.1, 73);
  return h;
}

HeadSpec Regressor() {
  const int64_t d = fuzz::TinyBert().info().embedding_dim;
  HeadSpec h;
  h.config = {{"type", "regression"}};
  h.tensors["out.weight"] = Rand({1, d}, 0.3, 80);
  h.tensors["out.bias"] = Rand({1}, 0.1, 81);
  return h;
}

PackContents Pack(const std::string& name, std::vector<MethodSpec> methods, std::optional<HeadSpec> head) {
  PackContents c;
  c.manifest.name = name;
  c.manifest.backbone_family = fuzz::TinyBert().info().family;
  c.manifest.backbone_fingerprint = fuzz::TinyBert().info().fingerprint;
  c.manifest.provenance = {{"made_by", "make_seed_corpus"}};
  c.methods = std::move(methods);
  c.head = std::move(head);
  return c;
}

// Writes the pack in canonical form after checking that it binds; returns the bytes ("" on failure).
std::string WritePack(const std::string& file, const PackContents& c) {
  std::string canonical;
  absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> pack =
      delta::DeltaPack::FromContents(c, fuzz::TinyBert(), delta::PackLimits(), &canonical);
  if (!pack.ok()) {
    Fail(file, pack.status());
    return "";
  }
  Write("delta_pack", file, canonical);
  return canonical;
}

void DeltaPacks() {
  const std::string lora = WritePack("lora_classifier.pack", Pack("lora", {Lora()}, Classifier()));
  WritePack("bitfit.pack", Pack("bitfit", {BitFit()}, std::nullopt));
  WritePack("ln_tuning_regression.pack", Pack("ln", {LnTuning()}, Regressor()));
  WritePack("ia3.pack", Pack("ia3", {Ia3()}, std::nullopt));
  WritePack("adapter.pack", Pack("adapter", {Adapter(MethodKind::kAdapter, Layer(0, "output"), 40)}, std::nullopt));
  WritePack("parallel_adapter.pack",
            Pack("padapter", {Adapter(MethodKind::kParallelAdapter, Layer(1, "output"), 44)}, std::nullopt));
  WritePack("prefix.pack", Pack("prefix", {Prefix()}, std::nullopt));
  WritePack("prompt.pack", Pack("prompt", {Prompt()}, std::nullopt));
  WritePack("all_methods.pack",
            Pack("all",
                 {Lora(), BitFit(), LnTuning(), Adapter(MethodKind::kParallelAdapter, Layer(1, "output"), 44), Ia3(),
                  Prefix(), Prompt(), Adapter(MethodKind::kAdapter, Layer(0, "output"), 40)},
                 Classifier()));
  // Malformed: cut short, a manifest that is not JSON, a method of an unknown kind.
  if (!lora.empty()) Write("delta_pack", "truncated.pack", lora.substr(0, lora.size() * 2 / 3));
  std::map<std::string, at::Tensor> t = {{"lora/x.lora_A", Rand({2, 8}, 1, 90)}};
  absl::StatusOr<std::string> bad_json = model::SerializeSafetensors(t, {{"deltaserve.manifest", "{\"format_\""}});
  if (bad_json.ok()) Write("delta_pack", "bad_manifest.pack", *bad_json);
  nlohmann::json manifest = {{"format_version", 1},
                             {"name", "x"},
                             {"backbone", {{"family", "bert"}, {"fingerprint", fuzz::TinyBert().info().fingerprint}}},
                             {"methods", {{"dora", nlohmann::json::object()}}}};
  absl::StatusOr<std::string> unknown = model::SerializeSafetensors({}, {{"deltaserve.manifest", manifest.dump()}});
  if (unknown.ok()) Write("delta_pack", "unknown_method.pack", *unknown);
}

// --- PEFT adapters ---

std::string PeftInput(uint8_t flags, const std::string& config, const std::string& weights) {
  std::string out(1, static_cast<char>(flags));
  const uint32_t n = static_cast<uint32_t>(config.size());
  for (int i = 0; i < 4; ++i) out += static_cast<char>((n >> (8 * i)) & 0xff);
  return out + config + weights;
}

void WritePeft(const std::string& file, uint8_t flags, const nlohmann::json& config,
               const std::map<std::string, at::Tensor>& tensors) {
  absl::StatusOr<std::string> weights = model::SerializeSafetensors(tensors, {{"format", "pt"}});
  if (!weights.ok()) {
    Fail(file, weights.status());
    return;
  }
  const std::string dir = fuzz::ScratchDir() + "/peft_" + file;
  std::filesystem::create_directories(dir);
  fuzz::WriteScratchFile(dir + "/adapter_config.json", config.dump(1));
  fuzz::WriteScratchFile(dir + "/adapter_model.safetensors", *weights);
  delta::PeftImportOptions options;
  options.import_head = (flags & 1) != 0;
  if ((flags & 4) != 0) options.labels = {"negative", "positive"};
  absl::StatusOr<PackContents> imported = delta::ImportPeft(dir, fuzz::TinyBert(), options);
  if (!imported.ok()) Fail(file, imported.status());
  Write("peft", file, PeftInput(flags, config.dump(1), *weights));
}

std::string Key(const std::string& module, const std::string& rest) {
  return absl::StrCat("base_model.model.", module, rest);
}

void PeftAdapters() {
  // What ExportPeftLora writes, read back.
  const std::string dir = fuzz::ScratchDir() + "/peft_export";
  delta::PeftExportOptions export_options;
  export_options.base_model_name_or_path = "tiny-bert";
  const absl::Status exported = delta::ExportPeftLora(Pack("lora", {Lora()}, std::nullopt), fuzz::TinyBert(), dir,
                                                      export_options);
  if (!exported.ok()) {
    Fail("peft export", exported);
  } else {
    std::ifstream config(dir + "/adapter_config.json", std::ios::binary);
    std::ifstream weights(dir + "/adapter_model.safetensors", std::ios::binary);
    Write("peft", "lora_export.bin",
          PeftInput(0, std::string(std::istreambuf_iterator<char>(config), {}),
                    std::string(std::istreambuf_iterator<char>(weights), {})));
  }

  // LoRA with bias "all" and a classifier in modules_to_save ("bert." prefix, as BertForSequenceClassification).
  {
    nlohmann::json config = {{"peft_type", "LORA"}, {"task_type", "SEQ_CLS"}, {"r", 2}, {"lora_alpha", 4},
                             {"target_modules", {"query", "value"}}, {"bias", "all"},
                             {"modules_to_save", {"classifier"}}, {"use_rslora", true}};
    std::map<std::string, at::Tensor> t;
    uint64_t seed = 100;
    for (int l = 0; l < 2; ++l) {
      for (const char* n : {"attention.self.query", "attention.self.value"}) {
        const model::ModuleInfo& m = Module(Layer(l, n));
        t[Key("bert." + m.name, ".lora_A.weight")] = Rand({2, m.in_features}, 0.3, seed++);
        t[Key("bert." + m.name, ".lora_B.weight")] = Rand({m.out_features, 2}, 0.1, seed++);
        t[Key("bert." + m.name, ".base_layer.bias")] = Rand({m.out_features}, 0.1, seed++);
      }
    }
    const int64_t d = fuzz::TinyBert().info().embedding_dim;
    t[Key("classifier.modules_to_save.default", ".weight")] = Rand({2, d}, 0.3, seed++);
    t[Key("classifier.modules_to_save.default", ".bias")] = Rand({2}, 0.1, seed++);
    WritePeft("lora_bias_classifier.bin", /*flags=*/1 | 4, config, t);
  }

  // IA3 on key, value and the feed-forward down-projection (input scaling).
  {
    nlohmann::json config = {{"peft_type", "IA3"},
                             {"task_type", "FEATURE_EXTRACTION"},
                             {"target_modules", {"key", "value", "output.dense"}},
                             {"feedforward_modules", {"output.dense"}},
                             {"fan_in_fan_out", false}};
    std::map<std::string, at::Tensor> t;
    uint64_t seed = 200;
    for (int l = 0; l < 2; ++l) {
      for (const char* n : {"attention.self.key", "attention.self.value"}) {
        const model::ModuleInfo& m = Module(Layer(l, n));
        t[Key(m.name, ".ia3_l")] = Rand({m.out_features, 1}, 0.1, seed++).add(1);
      }
      const model::ModuleInfo& ff = Module(Layer(l, "output.dense"));
      t[Key(ff.name, ".ia3_l")] = Rand({1, ff.in_features}, 0.1, seed++).add(1);
    }
    WritePeft("ia3.bin", 0, config, t);
  }

  const model::ModuleInfo& emb = Module("embeddings.word_embeddings");
  // Prompt tuning: the final soft tokens.
  {
    nlohmann::json config = {{"peft_type", "PROMPT_TUNING"}, {"task_type", "FEATURE_EXTRACTION"},
                             {"num_virtual_tokens", 3}, {"token_dim", emb.out_features},
                             {"num_transformer_submodules", 1}, {"num_attention_heads", 2}, {"num_layers", 2},
                             {"prompt_tuning_init", "RANDOM"}};
    WritePeft("prompt_tuning.bin", 0, config, {{"prompt_embeddings", Rand({3, emb.out_features}, 0.5, 300)}});
  }
  // Prefix tuning: [P, num_layers * 2 * token_dim].
  {
    nlohmann::json config = {{"peft_type", "PREFIX_TUNING"}, {"task_type", "FEATURE_EXTRACTION"},
                             {"num_virtual_tokens", 2}, {"token_dim", emb.out_features},
                             {"num_transformer_submodules", 1}, {"num_attention_heads", 2}, {"num_layers", 2},
                             {"prefix_projection", false}};
    WritePeft("prefix_tuning.bin", 0, config, {{"prompt_embeddings", Rand({2, 2 * 2 * emb.out_features}, 0.5, 400)}});
  }
  // Malformed: an unknown peft_type, a config that is not JSON.
  Write("peft", "unknown_type.bin", PeftInput(0, R"({"peft_type": "LOHA", "r": 2})", ""));
  Write("peft", "bad_config.bin", PeftInput(0, R"({"peft_type": "LORA", )", ""));
}

// --- safetensors ---

// A safetensors file from a header object and a data region, without the writer's checks.
std::string RawSafetensors(const nlohmann::json& header, const std::string& data) {
  std::string h = header.dump();
  std::string out(8, '\0');
  const uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + h + data;
}

void Safetensors() {
  std::ifstream model(fuzz::TinyBertDir() + "/model.safetensors", std::ios::binary);
  const std::string tiny(std::istreambuf_iterator<char>(model), {});
  // The tiny BERT is ~8 KB: keep the first tensors only, re-serialized.
  absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> f =
      model::SafetensorsFile::FromBuffer(tiny, model::SafetensorsFile::Options());
  if (f.ok()) {
    std::map<std::string, at::Tensor> some;
    for (const std::string& name : (*f)->names()) {
      if (name.find("layer.1") != std::string::npos || name.find("word_embeddings") != std::string::npos) continue;
      some[name] = *(*f)->Load(name, at::kFloat);
    }
    absl::StatusOr<std::string> bytes = model::SerializeSafetensors(some, {{"format", "pt"}});
    if (bytes.ok()) Write("safetensors", "bert_layer0.safetensors", *bytes);
  }
  std::map<std::string, at::Tensor> mixed = {
      {"f32", Rand({2, 3}, 1, 1)},
      {"f16", Rand({4}, 1, 2).to(at::kHalf)},
      {"bf16", Rand({2, 2}, 1, 3).to(at::kBFloat16)},
      {"i64", at::arange(5, at::kLong)},
      {"i32", at::arange(3, at::kInt).reshape({3, 1})},
      {"scalar", at::ones({}, at::kFloat)},
      {"empty", at::empty({0, 4}, at::kFloat)}};
  absl::StatusOr<std::string> bytes = model::SerializeSafetensors(mixed, {{"format", "pt"}, {"note", "héllo"}});
  if (bytes.ok()) Write("safetensors", "mixed_dtypes.safetensors", *bytes);

  // Dtypes only the reader knows (F64, I16, I8, U8, BOOL), by hand.
  nlohmann::json header = {
      {"__metadata__", {{"k", "v"}}},
      {"f64", {{"dtype", "F64"}, {"shape", {1}}, {"data_offsets", {0, 8}}}},
      {"i16", {{"dtype", "I16"}, {"shape", {2}}, {"data_offsets", {8, 12}}}},
      {"i8", {{"dtype", "I8"}, {"shape", {2}}, {"data_offsets", {12, 14}}}},
      {"u8", {{"dtype", "U8"}, {"shape", {1}}, {"data_offsets", {14, 15}}}},
      {"bool", {{"dtype", "BOOL"}, {"shape", {1}}, {"data_offsets", {15, 16}}}}};
  Write("safetensors", "other_dtypes.safetensors", RawSafetensors(header, std::string(16, '\1')));
  // Malformed: overlapping tensors, a hole, offsets past the end, a header length past the end.
  Write("safetensors", "overlap.safetensors",
        RawSafetensors({{"a", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}},
                        {"b", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {4, 8}}}}},
                       std::string(8, '\0')));
  Write("safetensors", "hole.safetensors",
        RawSafetensors({{"a", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {4, 8}}}}}, std::string(8, '\0')));
  Write("safetensors", "past_end.safetensors",
        RawSafetensors({{"a", {{"dtype", "I32"}, {"shape", {4}}, {"data_offsets", {0, 16}}}}}, std::string(8, '\0')));
  Write("safetensors", "huge_header_length.safetensors", std::string("\xff\xff\xff\xff\xff\xff\xff\x7f{}", 10));
}

// --- text inputs ---

void Datasets() {
  // Byte 0: the options (dataset_fuzzer.cc).
  Write("dataset", "sst2.tsv", std::string("\x01", 1) + "sentence\tlabel\nhide new secretions \t0\ngreat fun\t1\n\n"
                                                          "an utterly bad film\t0\n");
  Write("dataset", "quoted.csv", std::string("\x02", 1) + "text,label\n\"a, \"\"quoted\"\"\nline\",pos\nplain,neg\n"
                                                            "\"x\",pos\n");
  Write("dataset", "pair.jsonl", std::string("\x03", 1) +
                                     "{\"sentence1\": \"A man sleeps.\", \"sentence2\": \"Nobody sleeps.\", "
                                     "\"label\": 1}\n{\"sentence1\": \"It rains\", \"sentence2\": \"Wet\", "
                                     "\"label\": 0}\n{\"sentence1\": \"x\", \"sentence2\": \"y\", \"label\": 1}\n");
  Write("dataset", "auto_jsonl.jsonl", std::string("\x00", 1) + "{\"text\": \"h\\u00e9llo\", \"label\": \"pos\"}\n"
                                                                  "{\"text\": \"bye\", \"label\": \"neg\"}\n");
  Write("dataset", "auto_csv.csv", std::string("\x00", 1) + "label,text\r\n1,one\r\n0,zero\r\n1,\"multi\r\nline\"\r\n");
  Write("dataset", "no_header.tsv", std::string("\x05", 1) + "first text\t1\nsecond\t0\nthird\t1\n");
  Write("dataset", "named_columns.tsv", std::string("\x19", 1) + "text\ttext_pair\tlabel\na\tb\tx\nc\td\ty\ne\tf\tx\n");
  Write("dataset", "small_limits.tsv",
        std::string("\x21", 1) + "text\tlabel\n" + [] {
          std::string rows;
          for (int i = 0; i < 10; ++i) rows += absl::StrCat("row ", i, "\t", i % 2, "\n");
          return rows;
        }());
  Write("dataset", "regression.jsonl", std::string("\x43", 1) + "{\"text\": \"a\", \"label\": 0.5}\n"
                                                                  "{\"text\": \"b\", \"label\": 1e3}\n"
                                                                  "{\"text\": \"c\", \"label\": -2}\n");
  Write("dataset", "given_labels.tsv", std::string("\x81", 1) + "text\tlabel\na\t0\nb\t1\nc\t1\nd\t0\n");
  Write("dataset", "unterminated.csv", std::string("\x02", 1) + "text,label\n\"never closed,1\n");
  Write("dataset", "bad_utf8.tsv", std::string("\x01", 1) + "text\tlabel\n\xff\xfe\t1\n");
  Write("dataset", "wrong_fields.tsv", std::string("\x01", 1) + "text\tlabel\na\t1\textra\n");
  Write("dataset", "not_object.jsonl", std::string("\x03", 1) + "[1, 2]\n\"text\"\n");
}

void Tokenizers() {
  // wordpiece: byte 0 options, byte 1 limit, text [0x1f pair].
  Write("wordpiece", "plain.txt", std::string("\x00\x10", 2) + "Hello, world! The cat sat on the mat.");
  Write("wordpiece", "pair.txt", std::string("\x00\x06", 2) + "the dog runs\x1fthe cats were running");
  Write("wordpiece", "unicode.txt", std::string("\x00\x40", 2) + "Héllo naïve café über STRASSE ß ǅ ﬁ Ω 中国語 日本 "
                                                                 "한국 привет мир ελληνικά עברית العربية हिन्दी 😀😀");
  Write("wordpiece", "cased_accents.txt", std::string("\x03\x20", 2) + "Héllo NAÏVE Café");
  Write("wordpiece", "options.txt", std::string("\x3e\x08", 2) + "unable unbelievable\t\r\n\u200b\u00a0x\x01\x7f");
  Write("wordpiece", "invalid_utf8.txt", std::string("\x00\x10", 2) + "ok \xc3\x28 \xed\xa0\x80 \xf4\x90\x80\x80");
  Write("wordpiece", "long_word.txt", std::string("\x00\xff", 2) + std::string(150, 'x') + " " +
                                          std::string(40, '!') + "\x1f" + "ab");
  // use_lite_tokenizer: byte 0 limit, text [0x1f pair].
  Write("use_lite_tokenizer", "plain.txt", std::string("\x20", 1) + "Hello, world! I like the cat.");
  Write("use_lite_tokenizer", "pair.txt", std::string("\x05", 1) + "how are you\x1fI am fine, thanks");
  Write("use_lite_tokenizer", "nfkc.txt", std::string("\x40", 1) + "ﬁnally ① Ⅻ ｆｕｌｌｗｉｄｔｈ  tabs\tand\nnewlines "
                                                                   "😀 中文 e\u0301");
  Write("use_lite_tokenizer", "unknown.txt", std::string("\x10", 1) + "ᚠᛇᚻ ᛒᛦᚦ \u2581\u2581 ::: '''");
  Write("use_lite_tokenizer", "invalid_utf8.txt", std::string("\x10", 1) + "ok \xff \xc0\xaf");
}

void TaskRefs() {
  // Byte 0: bit 0 = a default tenant ("acme").
  const std::string digest = Sha256Digest("seed");
  Write("task_ref", "tenant_task.txt", std::string("\x00", 1) + "acme/sst2");
  Write("task_ref", "version.txt", std::string("\x00", 1) + "acme/sst2@3");
  Write("task_ref", "label.txt", std::string("\x00", 1) + "acme/sst2:prod");
  Write("task_ref", "digest.txt", std::string("\x00", 1) + digest);
  Write("task_ref", "task_digest.txt", std::string("\x00", 1) + "acme/sst2@" + digest);
  Write("task_ref", "default_tenant.txt", std::string("\x01", 1) + "sst2:canary-1.b_2");
  Write("task_ref", "bad_version.txt", std::string("\x00", 1) + "acme/sst2@0");
  Write("task_ref", "digit_label.txt", std::string("\x00", 1) + "acme/sst2:123");
  Write("task_ref", "upper.txt", std::string("\x01", 1) + "Acme/Task");
  Write("task_ref", "too_long.txt", std::string("\x00", 1) + "acme/" + std::string(65, 'a'));
}

void Tenants() {
  // Byte 0: even = a tenants file, odd = an authorization header (bit 1: then 0x1f and a certificate name).
  const std::string live = "dst_0123456789ab_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";  // tenants_fuzzer.cc
  const std::string revoked = "dst_fedcba987654_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";
  nlohmann::json file = {
      {"format", 1},
      {"default_quota", {{"requests_per_second", 50}, {"burst", 100}, {"max_concurrent_requests", 8},
                         {"store_bytes", 1 << 30}, {"max_packs", 100}, {"max_running_jobs", 1},
                         {"max_queued_jobs", 4}}},
      {"tenants",
       {{"acme",
         {{"role", "tenant"},
          {"quota", {{"max_concurrent_requests", 2}, {"requests_per_second", 0.5}}},
          {"certificate_names", {"acme-prod"}},
          {"tokens",
           {{{"id", "0123456789ab"}, {"sha256", auth::HashToken(live)}, {"created", "2026-11-29T18:00:00Z"},
             {"description", "ci"}},
            {{"id", "fedcba987654"}, {"sha256", auth::HashToken(revoked)}, {"created", "2026-11-29T18:00:00Z"},
             {"revoked", "2026-12-01T09:00:00+01:00"}}}}}},
        {"ops", {{"role", "admin"}, {"tokens", nlohmann::json::array()}}}}}};
  absl::StatusOr<auth::TenantsFile> parsed = auth::ParseTenantsFile(file.dump(2));
  if (!parsed.ok()) Fail("tenants file.json", parsed.status());
  Write("tenants", "file.json", std::string("\x00", 1) + file.dump(2));
  Write("tenants", "minimal.json", std::string("\x00", 1) + R"({"format": 1, "tenants": {}})");
  Write("tenants", "bad_role.json",
        std::string("\x00", 1) + R"({"format": 1, "tenants": {"a": {"role": "root", "tokens": []}}})");
  Write("tenants", "bad_hash.json",
        std::string("\x00", 1) + R"({"format": 1, "tenants": {"a": {"tokens": [{"id": "0123456789ab", )"
                                  R"("sha256": "XYZ", "created": "yesterday"}]}}})");
  Write("tenants", "live_token.txt", std::string("\x01", 1) + "Bearer " + live);
  Write("tenants", "revoked_token.txt", std::string("\x01", 1) + "bearer " + revoked);
  Write("tenants", "unknown_token.txt",
        std::string("\x01", 1) + "Bearer dst_aaaaaaaaaaaa_CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC");
  Write("tenants", "malformed_header.txt", std::string("\x01", 1) + "Basic dXNlcjpwYXNz");
  Write("tenants", "certificate.txt", std::string("\x03", 1) + "\x1f" + "acme-prod");
  Write("tenants", "token_and_certificate.txt", std::string("\x03", 1) + "Bearer " + live + "\x1f" + "ops");
}

}  // namespace
}  // namespace deltaserve

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR (e.g. tests/fuzz/corpus)\n", argv[0]);
    return 2;
  }
  deltaserve::g_out = argv[1];
  deltaserve::DeltaPacks();
  deltaserve::PeftAdapters();
  deltaserve::Safetensors();
  deltaserve::Datasets();
  deltaserve::Tokenizers();
  deltaserve::TaskRefs();
  deltaserve::Tenants();
  if (deltaserve::g_failures > 0) {
    std::fprintf(stderr, "%d seeds failed (see above)\n", deltaserve::g_failures);
    return 1;
  }
  return 0;
}
