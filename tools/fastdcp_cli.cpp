// The fastdcp command: look into and check checkpoints.
//
//   fastdcp inspect PATH [--rank R]   the commit record, then each rank's tree: dtypes, shapes, sizes
//   fastdcp verify PATH               every file against the manifest, every chunk's checksum
//
// Exit status: 0 success, 1 damaged or missing checkpoint, 2 bad usage.

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/common/error.h"
#include "fastdcp/format/rank_file.h"
#include "fastdcp/io/file.h"

namespace {

using namespace fastdcp;

constexpr const char* kUsage =
    "usage: fastdcp inspect PATH [--rank R]\n"
    "       fastdcp verify PATH\n";

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

void print_tensors(const RankFileHeader& header, int rank) {
  for (const RankFileHeader::TensorRecord& t : header.tensors()) {
    std::string shape;
    uint64_t numel = 1;
    for (const int64_t d : t.shape) {
      shape += (shape.empty() ? "" : ", ") + std::to_string(d);
      numel *= static_cast<uint64_t>(d);
    }
    // The framework's dtype where the bytes are stored under another (torch.complex32 as U32).
    const std::string_view dtype = t.traits.framework_dtype.empty() ? dtype_name(t.dtype) : t.traits.framework_dtype;
    std::printf("  [%d] %-60s %-6.*s [%s]  %s\n", rank, t.path.c_str(), static_cast<int>(dtype.size()), dtype.data(),
                shape.c_str(), human_bytes(static_cast<double>(dtype_storage_bytes(t.dtype, numel))).c_str());
  }
}

int inspect(const std::string& path, int only_rank) {
  const Manifest manifest = read_manifest(path);
  uint64_t total = 0;
  for (const auto& r : manifest.ranks) total += r.size;
  std::printf("%s: committed checkpoint, generation %llu, %d rank%s, %s\n", path.c_str(),
              static_cast<unsigned long long>(manifest.generation), manifest.world_size,
              manifest.world_size == 1 ? "" : "s", human_bytes(static_cast<double>(total)).c_str());
  for (const auto& r : manifest.ranks) {
    if (only_rank >= 0 && r.rank != only_rank) continue;
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
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() < 2 || (args[0] != "inspect" && args[0] != "verify")) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  int rank = -1;
  for (size_t i = 2; i < args.size(); ++i) {
    if (args[0] == "inspect" && args[i] == "--rank" && i + 1 < args.size()) {
      rank = std::atoi(args[++i].c_str());
    } else {
      std::fprintf(stderr, "fastdcp: unknown argument '%s'\n%s", args[i].c_str(), kUsage);
      return 2;
    }
  }
  try {
    return args[0] == "inspect" ? inspect(args[1], rank) : verify(args[1]);
  } catch (const fastdcp::Error& e) {
    std::fprintf(stderr, "fastdcp %s: %s\n", args[0].c_str(), e.what());
    return 1;
  }
}
