// deltaserve-pack: looks into delta packs and converts them from / to Hugging Face PEFT adapters
// (docs/DELTA_PACK.md, "PEFT interop").
//
//   deltaserve-pack inspect PACK
//       the manifest, every tensor with its shape, and the digest (no model needed)
//   deltaserve-pack import-peft --model_dir=DIR [--name=N] [--labels=a,b] [--import_head] [--skip_head]
//                               PEFT_DIR OUT.dpack
//       PEFT_DIR (adapter_config.json + adapter_model.safetensors) -> a canonical pack for the model in DIR
//   deltaserve-pack export-peft --model_dir=DIR [--base_model_name_or_path=S] [--module_prefix=P] [--skip_head]
//                               PACK OUT_DIR
//       a LoRA pack -> OUT_DIR/adapter_config.json + adapter_model.safetensors
//
// Errors: "deltaserve-pack: CODE: message" on stderr and exit status 1; usage errors exit 2.
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "server/common/file_util.h"
#include "server/common/sha256.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"
#include "server/delta/delta_pack.h"
#include "server/delta/peft.h"
#include "server/model/model_loader.h"
#include "server/model/safetensors.h"

ABSL_FLAG(std::string, model_dir, "", "import-peft / export-peft: the backbone's model directory");
ABSL_FLAG(std::string, name, "", "import-peft: the pack's manifest name");
ABSL_FLAG(std::vector<std::string>, labels, {},
          "import-peft: classification labels of a modules_to_save classifier (default LABEL_0, LABEL_1, ...)");
ABSL_FLAG(bool, import_head, false,
          "import-peft: import a classifier even when the pack's head cannot reproduce it exactly");
ABSL_FLAG(bool, skip_head, false, "import-peft: never import a head; export-peft: leave the pack's head out");
ABSL_FLAG(std::string, base_model_name_or_path, "",
          "export-peft: adapter_config.json's base_model_name_or_path (default: --model_dir)");
ABSL_FLAG(std::string, module_prefix, "",
          "export-peft: prefix of the module names in the keys, e.g. \"bert.\" (default: none, as for a BertModel)");

namespace deltaserve {
namespace {

constexpr char kUsage[] =
    "Inspects delta packs and converts them from / to Hugging Face PEFT adapters.\n"
    "  deltaserve-pack inspect PACK\n"
    "  deltaserve-pack import-peft --model_dir=DIR [--name=N] [--labels=a,b] [--import_head] [--skip_head] "
    "PEFT_DIR OUT.dpack\n"
    "  deltaserve-pack export-peft --model_dir=DIR [--base_model_name_or_path=S] [--module_prefix=P] [--skip_head] "
    "PACK OUT_DIR";

struct Flags {
  std::string model_dir;
  std::string name;
  std::vector<std::string> labels;
  bool import_head = false;
  bool skip_head = false;
  std::string base_model_name_or_path;
  std::string module_prefix;
};

absl::StatusOr<delta::PackContents> ReadPack(const std::string& path, std::string* bytes) {
  DS_ASSIGN_OR_RETURN(*bytes, ReadFileToString(path));
  absl::StatusOr<delta::PackContents> contents = delta::ParsePack(*bytes, delta::PackLimits());
  if (!contents.ok()) {
    return absl::Status(contents.status().code(), absl::StrCat(path, ": ", contents.status().message()));
  }
  return contents;
}

absl::StatusOr<std::unique_ptr<model::Model>> LoadBackbone(const Flags& flags) {
  if (flags.model_dir.empty()) return absl::InvalidArgumentError("--model_dir is required");
  return model::LoadModel(flags.model_dir, model::ModelOptions());
}

absl::Status Inspect(const std::string& path) {
  std::string bytes;
  DS_ASSIGN_OR_RETURN(delta::PackContents contents, ReadPack(path, &bytes));
  DS_ASSIGN_OR_RETURN(std::string canonical, delta::SerializePack(contents));
  // The manifest as stored (ParsePack validated it).
  DS_ASSIGN_OR_RETURN(std::unique_ptr<model::SafetensorsFile> file,
                      model::SafetensorsFile::FromBuffer(bytes, model::SafetensorsFile::Options(), path));
  const nlohmann::json manifest =
      nlohmann::json::parse(file->metadata().at("deltaserve.manifest"), nullptr, /*allow_exceptions=*/false);
  std::cout << "pack: " << path << " (" << bytes.size() << " bytes)\n";
  std::cout << "digest: " << Sha256Digest(canonical) << "\n";
  if (canonical != bytes) {
    std::cout << "note: the file is not in canonical form (its own sha256 is " << Sha256Digest(bytes)
              << "); the digest above is of its re-serialization, and a server that binds it reports the digest of "
                 "the canonical form after binding (targets resolved, defaults filled in)\n";
  }
  std::cout << "manifest:\n" << manifest.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  std::cout << "tensors:\n";
  for (const delta::MethodSpec& m : contents.methods) {
    for (const auto& [name, t] : m.tensors) {
      std::cout << "  " << delta::MethodKindName(m.kind) << "/" << name << " " << ShapeString(t.sizes()) << "\n";
    }
  }
  if (contents.head.has_value()) {
    for (const auto& [name, t] : contents.head->tensors) {
      std::cout << "  head/" << name << " " << ShapeString(t.sizes()) << "\n";
    }
  }
  return absl::OkStatus();
}

absl::Status ImportPeftCommand(const Flags& flags, const std::string& peft_dir, const std::string& out) {
  DS_ASSIGN_OR_RETURN(std::unique_ptr<model::Model> model, LoadBackbone(flags));
  delta::PeftImportOptions options;
  options.name = flags.name;
  options.labels = flags.labels;
  options.import_head = flags.import_head;
  options.skip_head = flags.skip_head;
  options.base_checkpoint = flags.model_dir + "/model.safetensors";
  DS_ASSIGN_OR_RETURN(delta::PackContents contents, delta::ImportPeft(peft_dir, *model, options));
  DS_ASSIGN_OR_RETURN(std::string bytes, delta::SerializePack(contents));
  DS_RETURN_IF_ERROR(WriteFileAtomically(out, bytes));
  std::vector<std::string> methods;
  for (const delta::MethodSpec& m : contents.methods) methods.push_back(delta::MethodKindName(m.kind));
  if (contents.head.has_value()) methods.push_back("head");
  std::cout << "wrote " << out << " (" << bytes.size() << " bytes; " << absl::StrJoin(methods, ", ") << ")\n"
            << "digest: " << Sha256Digest(bytes) << "\n";
  auto notes = contents.manifest.provenance.find("notes");
  if (notes != contents.manifest.provenance.end() && notes->is_array()) {
    for (const auto& note : *notes) {
      if (note.is_string()) std::cerr << "deltaserve-pack: note: " << note.get<std::string>() << "\n";
    }
  }
  return absl::OkStatus();
}

absl::Status ExportPeftCommand(const Flags& flags, const std::string& pack_path, const std::string& out_dir) {
  std::string bytes;
  DS_ASSIGN_OR_RETURN(delta::PackContents contents, ReadPack(pack_path, &bytes));
  DS_ASSIGN_OR_RETURN(std::unique_ptr<model::Model> model, LoadBackbone(flags));
  delta::PeftExportOptions options;
  options.base_model_name_or_path =
      flags.base_model_name_or_path.empty() ? flags.model_dir : flags.base_model_name_or_path;
  options.module_prefix = flags.module_prefix;
  options.skip_head = flags.skip_head;
  DS_RETURN_IF_ERROR(delta::ExportPeftLora(contents, *model, out_dir, options));
  std::cout << "wrote " << out_dir << "/adapter_config.json and " << out_dir << "/adapter_model.safetensors\n";
  return absl::OkStatus();
}

int Usage(const std::string& problem) {
  std::cerr << "deltaserve-pack: " << problem << "\n" << kUsage << "\n";
  return 2;
}

int Run(const Flags& flags, const std::vector<std::string>& args) {
  if (args.empty()) return Usage("no command");
  const std::string& command = args[0];
  absl::Status status;
  if (command == "inspect") {
    if (args.size() != 2) return Usage("inspect takes one PACK");
    status = Inspect(args[1]);
  } else if (command == "import-peft") {
    if (args.size() != 3) return Usage("import-peft takes PEFT_DIR and OUT.dpack");
    if (flags.model_dir.empty()) return Usage("import-peft needs --model_dir");
    status = ImportPeftCommand(flags, args[1], args[2]);
  } else if (command == "export-peft") {
    if (args.size() != 3) return Usage("export-peft takes PACK and OUT_DIR");
    if (flags.model_dir.empty()) return Usage("export-peft needs --model_dir");
    status = ExportPeftCommand(flags, args[1], args[2]);
  } else {
    return Usage(absl::StrCat("unknown command \"", command, "\""));
  }
  if (!status.ok()) {
    std::cerr << "deltaserve-pack: " << absl::StatusCodeToString(status.code()) << ": " << status.message() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace deltaserve

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(deltaserve::kUsage);
  const std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  deltaserve::Flags flags;
  flags.model_dir = absl::GetFlag(FLAGS_model_dir);
  flags.name = absl::GetFlag(FLAGS_name);
  flags.labels = absl::GetFlag(FLAGS_labels);
  flags.import_head = absl::GetFlag(FLAGS_import_head);
  flags.skip_head = absl::GetFlag(FLAGS_skip_head);
  flags.base_model_name_or_path = absl::GetFlag(FLAGS_base_model_name_or_path);
  flags.module_prefix = absl::GetFlag(FLAGS_module_prefix);
  std::vector<std::string> args(positional.begin() + 1, positional.end());
  return deltaserve::Run(flags, args);
}
