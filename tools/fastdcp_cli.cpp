// The fastdcp command: look into and check checkpoints.
//
//   fastdcp inspect PATH [--rank R]   the commit record, then each rank's tree: dtypes, shapes, sizes
//   fastdcp verify PATH               every file against the manifest, every chunk's checksum
//   fastdcp convert SRC DST           a torch DCP or _experimental checkpoint into a fastdcp one
//   fastdcp export-hf PATH OUT [...]  a Hugging Face model directory (safetensors shards + index)
//
// PATH is the checkpoint directory or its manifest.json. Exit status: 0 success (and --help),
// 1 damaged or missing checkpoint, 2 bad usage (the message names the option).

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/common/error.h"
#include "fastdcp/format/rank_file.h"
#include "fastdcp/interop/hugging_face.h"
#include "fastdcp/io/file.h"

namespace {

using namespace fastdcp;

// Bad usage found once the checkpoint is open (a --rank it does not have): exit status 2.
struct UsageError {
  std::string message;
};

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  int unit = 0;
  while (bytes >= 1000 && unit < 4) {
    bytes /= 1000;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof text, unit == 0 ? "%.0f %s" : "%.1f %s", bytes, units[unit]);
  return text;
}

// Redraws one line on stderr, only when it is a terminal.
class ProgressBar {
 public:
  explicit ProgressBar(const char* label) : label_(label), enabled_(::isatty(STDERR_FILENO)) {}
  ~ProgressBar() {
    if (enabled_ && drawn_) std::fputc('\n', stderr);
  }
  void update(uint64_t done, uint64_t total) {
    const auto now = std::chrono::steady_clock::now();
    if (!enabled_ || (now - last_ < std::chrono::milliseconds(100) && done < total)) return;
    last_ = now;
    drawn_ = true;
    const double fraction = total ? static_cast<double>(done) / static_cast<double>(total) : 1.0;
    const int filled = static_cast<int>(fraction * 30);
    std::fprintf(stderr, "\r%s [%.*s%*s] %3.0f%% %s / %s", label_, filled, "##############################",
                 30 - filled, "", fraction * 100, human_bytes(static_cast<double>(done)).c_str(),
                 human_bytes(static_cast<double>(total)).c_str());
    std::fflush(stderr);
  }

 private:
  const char* label_;
  bool enabled_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point last_{};
};

// "[0:4, 2:3]": a box as index ranges.
std::string box_text(const Dims& offset, const Dims& sizes) {
  std::string out = "[";
  for (size_t d = 0; d < offset.size(); ++d) {
    out += (d ? ", " : "") + std::to_string(offset[d]) + ":" + std::to_string(offset[d] + sizes[d]);
  }
  return out + "]";
}

// The global index (Note [Global index]): each sharded key's global shape, dtype and split.
void print_index(const Manifest& manifest) {
  if (manifest.index.empty()) return;
  std::printf("sharded tensors (global index): %zu\n", manifest.index.size());
  constexpr size_t kShownBoxes = 8;
  for (const IndexEntry& e : manifest.index) {
    std::map<int, size_t> per_rank;
    for (const IndexChunk& c : e.chunks) ++per_rank[c.rank];
    std::string split;
    for (const auto& [rank, n] : per_rank) split += (split.empty() ? "" : ", ") + std::to_string(rank) + ":" + std::to_string(n);
    const std::string_view dtype = dtype_name(e.dtype);
    std::printf("  %-60s %-6.*s %s  %zu chunk%s; chunks per rank %s\n", e.key.c_str(), static_cast<int>(dtype.size()),
                dtype.data(), dims_text(e.global_shape).c_str(), e.chunks.size(), e.chunks.size() == 1 ? "" : "s",
                split.c_str());
    std::string boxes;
    for (size_t i = 0; i < e.chunks.size() && i < kShownBoxes; ++i) {
      boxes += "  rank " + std::to_string(e.chunks[i].rank) + " " + box_text(e.chunks[i].offset, e.chunks[i].sizes);
    }
    if (e.chunks.size() > kShownBoxes) boxes += "  (and " + std::to_string(e.chunks.size() - kShownBoxes) + " more)";
    std::printf("   %s\n", boxes.c_str());
  }
}

void print_tensors(const RankFileHeader& header, int rank) {
  // A sharded leaf's chunks are listed with their place in the global tensor.
  std::map<std::string, const RankFileHeader::ShardedRecord*> sharded;
  const auto records = header.sharded();
  for (const auto& r : records) sharded.emplace(r.path, &r);
  std::map<std::string, size_t> chunks_seen;
  for (const RankFileHeader::TensorRecord& t : header.tensors()) {
    std::string shape;
    uint64_t numel = 1;
    for (const int64_t d : t.shape) {
      shape += (shape.empty() ? "" : ", ") + std::to_string(d);
      numel *= static_cast<uint64_t>(d);
    }
    // The framework's dtype where the bytes are stored under another (torch.complex32 as U32).
    const std::string_view dtype = t.traits.framework_dtype.empty() ? dtype_name(t.dtype) : t.traits.framework_dtype;
    std::string place;
    if (const auto it = sharded.find(t.path); it != sharded.end()) {
      const size_t k = chunks_seen[t.path]++;
      if (k < it->second->chunks.size()) {
        place = "  chunk " + box_text(it->second->chunks[k].first, t.shape) + " of " + dims_text(it->second->global_shape);
      }
    }
    std::printf("  [%d] %-60s %-6.*s [%s]  %s%s\n", rank, t.path.c_str(), static_cast<int>(dtype.size()), dtype.data(),
                shape.c_str(), human_bytes(static_cast<double>(dtype_storage_bytes(t.dtype, numel))).c_str(),
                place.c_str());
  }
}

int inspect(const std::string& path, std::optional<int> only_rank) {
  const Manifest manifest = read_manifest(path);
  if (only_rank && *only_rank >= manifest.world_size) {
    throw UsageError{"--rank " + std::to_string(*only_rank) + ": '" + path + "' was written by " +
                     std::to_string(manifest.world_size) + " rank" + (manifest.world_size == 1 ? "" : "s") +
                     " (ranks 0 to " + std::to_string(manifest.world_size - 1) + ")"};
  }
  uint64_t total = 0;
  for (const auto& r : manifest.ranks) total += r.size;
  std::printf("%s: committed checkpoint, generation %llu, %d rank%s, %s\n", path.c_str(),
              static_cast<unsigned long long>(manifest.generation), manifest.world_size,
              manifest.world_size == 1 ? "" : "s", human_bytes(static_cast<double>(total)).c_str());
  print_index(manifest);
  for (const auto& r : manifest.ranks) {
    if (only_rank && r.rank != *only_rank) continue;
    const std::string file_path = join_path(path, r.file);
    const File file = File::open(file_path, File::Mode::kRead);
    const RankFileHeader header = RankFileHeader::read(
        [&](void* dst, uint64_t offset, uint64_t n) { file.read_at(dst, n, offset); }, file.size(), file_path);
    std::printf("rank %d: %s, %s, %zu stored entries, format version %d\n", r.rank, r.file.c_str(),
                human_bytes(static_cast<double>(r.size)).c_str(), header.entries().size(), header.format_version());
    print_tensors(header, r.rank);
  }
  return 0;
}

int verify(const std::string& path) {
  VerifyReport report;
  {
    ProgressBar bar("verifying");
    report = verify_checkpoint(path, [&](uint64_t done, uint64_t total) { bar.update(done, total); });
  }
  std::printf("%s: OK, %d file%s, %s, %llu chunks verified\n", path.c_str(), report.files,
              report.files == 1 ? "" : "s", human_bytes(static_cast<double>(report.bytes)).c_str(),
              static_cast<unsigned long long>(report.chunks));
  if (report.files_without_checksums > 0) {
    std::printf("%d file%s without checksums (plain safetensors): header and layout checked, data not\n",
                report.files_without_checksums, report.files_without_checksums == 1 ? " is" : "s are");
  }
  return 0;
}

// Reading torch's formats needs torch, so the conversion is Python's (fastdcp.torch.convert): run
// by the interpreter FASTDCP_PYTHON names, else the python beside this executable (both are in a
// virtual environment's bin). Returns only if neither can be started.
int convert(const std::string& src, const std::string& dst, bool overwrite) {
  std::vector<std::string> candidates;
  if (const char* named = std::getenv("FASTDCP_PYTHON"); named && *named) {
    candidates.emplace_back(named);
  } else {
    std::error_code error;
    const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", error);
    if (!error) {
      for (const char* name : {"python3", "python"}) candidates.push_back((self.parent_path() / name).string());
    }
  }
  for (const std::string& python : candidates) {
    std::vector<const char*> args{python.c_str(), "-m", "fastdcp.torch.convert", src.c_str(), dst.c_str()};
    if (overwrite) args.push_back("--overwrite");
    args.push_back(nullptr);
    ::execv(python.c_str(), const_cast<char* const*>(args.data()));  // returns only on failure
  }
  std::string tried;
  for (const std::string& python : candidates) tried += (tried.empty() ? "" : ", ") + python;
  std::fprintf(stderr,
               "fastdcp convert: needs a Python with fastdcp and torch installed, and found none (tried: %s); "
               "set FASTDCP_PYTHON to that interpreter, or run 'python -m fastdcp.torch.convert SRC DST'\n",
               tried.empty() ? "nothing" : tried.c_str());
  return 1;
}

int export_hf(const std::string& path, const std::string& out, const HfExportOptions& options) {
  const int world_size = read_manifest(path).world_size;
  if (options.rank >= world_size) {
    throw UsageError{"--rank " + std::to_string(options.rank) + ": '" + path + "' was written by " +
                     std::to_string(world_size) + " rank" + (world_size == 1 ? "" : "s")};
  }
  const HfExportReport report = export_hugging_face(path, out, options);
  std::printf("%s: %zu tensor%s, %s, in %zu file%s%s\n", out.c_str(), report.tensors, report.tensors == 1 ? "" : "s",
              human_bytes(static_cast<double>(report.total_size)).c_str(), report.files.size(),
              report.files.size() == 1 ? "" : "s", report.index_file.empty() ? "" : " with model.safetensors.index.json");
  for (const auto& [key, why] : report.skipped) std::printf("skipped %s: %s\n", key.c_str(), why.c_str());
  return 0;
}

// A checkpoint is named by its directory; its manifest.json names the same checkpoint.
std::string checkpoint_dir(const std::string& path) {
  const std::filesystem::path p(path);
  std::error_code error;
  if (p.filename() != kManifestName || std::filesystem::is_directory(p, error)) return path;
  return p.has_parent_path() ? p.parent_path().string() : ".";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Looks into fastdcp checkpoints and checks them (docs/cli.md).", "fastdcp"};
  app.require_subcommand(0, 1);  // none is reported below, naming the commands
  std::string path;
  std::optional<int> rank;
  CLI::App* inspect_command = app.add_subcommand(
      "inspect", "The commit record, then each rank's tensors: dtypes, shapes, sizes (no data is read).");
  inspect_command->add_option("PATH", path, "the checkpoint directory (or its manifest.json)")->required();
  inspect_command->add_option("--rank", rank, "list only this rank's tensors (0 to the number of ranks - 1)");
  CLI::App* verify_command =
      app.add_subcommand("verify", "Every rank's file against the manifest, every chunk's checksum.");
  verify_command->add_option("PATH", path, "the checkpoint directory (or its manifest.json)")->required();
  std::string destination;
  bool overwrite = false;
  CLI::App* convert_command = app.add_subcommand(
      "convert", "A torch DCP or _experimental checkpoint (or a fastdcp one) into a fastdcp checkpoint.");
  convert_command->add_option("SRC", path, "the checkpoint directory to read")->required();
  convert_command->add_option("DST", destination, "the fastdcp checkpoint directory to write")->required();
  convert_command->add_flag("--overwrite", overwrite, "replace a committed checkpoint at DST");
  std::string out, max_shard_size = "5GB", dtype;
  HfExportOptions hf_options;
  CLI::App* export_command = app.add_subcommand(
      "export-hf", "A Hugging Face model directory: model-0000k-of-0000n.safetensors and their index.");
  export_command->add_option("PATH", path, "the checkpoint directory (or its manifest.json)")->required();
  export_command->add_option("OUT", out, "the model directory to write (created if missing)")->required();
  export_command->add_option("--max-shard-size", max_shard_size,
                             "largest file, as 5GB (decimal) or 2GiB (binary); a larger tensor gets its own (default 5GB)");
  export_command->add_option("--dtype", dtype, "cast floating tensors to bf16, f16, f32 or f64");
  export_command->add_option("--prefix", hf_options.prefix, "export only key paths that start with this (as model.)");
  export_command->add_flag("--strip-prefix", hf_options.strip_prefix, "remove --prefix from the exported names");
  export_command->add_option("--rank", rank, "which rank's part of a checkpoint of several ranks (default 0)");
  export_command->add_flag("--overwrite", hf_options.overwrite,
                           "write into a directory that is not empty, replacing an earlier export");
  const auto usage_error = [](const std::string& message) {
    std::fprintf(stderr, "fastdcp: %s\nRun 'fastdcp --help' for usage.\n", message.c_str());
    return 2;
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help: the usage on standard output, status 0
    return usage_error(e.what());
  }
  if (app.get_subcommands().empty()) return usage_error("a command is required: inspect, verify, convert or export-hf");
  if (convert_command->parsed()) return convert(path, destination, overwrite);
  if (rank && *rank < 0) return usage_error("--rank: " + std::to_string(*rank) + " is not a rank (ranks start at 0)");
  const bool inspecting = inspect_command->parsed();
  const bool exporting = export_command->parsed();
  const char* command = inspecting ? "inspect" : exporting ? "export-hf" : "verify";
  if (exporting) {
    try {
      hf_options.max_shard_bytes = hf::parse_size(max_shard_size, "--max-shard-size");
      if (!dtype.empty()) hf_options.dtype = hf::parse_float_dtype(dtype, "--dtype");
    } catch (const fastdcp::Error& e) {
      return usage_error(e.what());
    }
    if (hf_options.strip_prefix && hf_options.prefix.empty()) return usage_error("--strip-prefix needs --prefix");
    hf_options.rank = rank.value_or(0);
  }
  try {
    const std::string dir = checkpoint_dir(path);
    if (exporting) return export_hf(dir, out, hf_options);
    return inspecting ? inspect(dir, rank) : verify(dir);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "fastdcp %s: %s\n", command, e.message.c_str());
    return 2;
  } catch (const fastdcp::Error& e) {
    std::fprintf(stderr, "fastdcp %s: %s\n", command, e.what());
    return 1;
  }
}
