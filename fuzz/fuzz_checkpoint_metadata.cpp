// libFuzzer target for everything fastdcp parses from a checkpoint directory before it trusts it:
// the rank file header (JSON, tree, storages, checksums) and the manifest. Any outcome but a
// parsed result or a fastdcp::Error is a finding. Run by scripts/test.sh for a bounded time.

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "fastdcp/common/error.h"
#include "fastdcp/format/manifest.h"
#include "fastdcp/format/rank_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  try {
    (void)fastdcp::parse_manifest(input, "fuzz/manifest.json");
  } catch (const fastdcp::Error&) {
  }
  // Rank headers: the first 8 bytes say how much tensor data the "file" holds after the header
  // (so that the layout checks can pass and the tree is built), the rest is the header text.
  if (size < 8) return 0;
  uint64_t data_bytes = 0;
  for (int k = 7; k >= 0; --k) data_bytes = (data_bytes << 8) | data[k];
  data_bytes &= (uint64_t{1} << 40) - 1;
  const std::string_view text = input.substr(8);
  try {
    const auto header = fastdcp::RankFileHeader::parse(text, 8 + text.size() + data_bytes, "fuzz.safetensors");
    uint64_t total = 0;
    for (const auto& e : header.entries()) total += e.nbytes;
    if (total > (uint64_t{64} << 20)) return 0;  // would only test the allocator
    std::vector<fastdcp::Storage> storages;
    for (const auto& e : header.entries()) storages.push_back(fastdcp::Storage::allocate_cpu(e.nbytes));
    (void)header.build_tree(storages);
    (void)header.tensors();
  } catch (const fastdcp::Error&) {
  }
  return 0;
}
