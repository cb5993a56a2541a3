#pragma once
// Hugging Face model directories: a fastdcp checkpoint exported as one (safetensors shards and
// their index), and one loaded into a state dict, in place or as a flat dict.
//
// Note [Hugging Face model directories]
// A model directory holds either one `model.safetensors` or `model-0000k-of-0000n.safetensors`
// shards with `model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map":
// {name: file}}). Names are key paths as fastdcp spells them ("model.layers.0.mlp.up_proj.weight").
// Export reads the checkpoint through the public reader, mapped (pages come from the page cache as
// each tensor is written, so nothing holds the checkpoint). Sharded keys are assembled from every
// rank's chunks (CheckpointReader::read_sharded) just before the file that holds them is written,
// and released after: an export holds at most one output file's worth of them (or one tensor, if
// larger), so a checkpoint larger than memory exports. Each shard is written under a temporary
// name, created new and never through a link, and every shard, then the index, is renamed into
// place only once all are written: a failed export leaves the directory as it was. Import parses each
// file's header with the rank-file parser (a plain safetensors file is a rank file without
// checksums) and reads only the byte ranges of the tensors the target asks for, in parallel, into
// the target's memory where it is contiguous and of the stored dtype. Every target is a box of a
// stored tensor (the whole tensor for a plain one, a rank's chunk for a sharded one, Note [Sharded
// tensors]): a box reads as runs of contiguous bytes, one run per row of the dims it cuts.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/tensor/value.h"

namespace fastdcp {

// What transformers names its files.
inline constexpr std::string_view kHfSingleFile = "model.safetensors";
inline constexpr std::string_view kHfIndexFile = "model.safetensors.index.json";
// transformers' and huggingface_hub's default shard size: 5 GB (decimal).
inline constexpr uint64_t kHfDefaultMaxShardBytes = 5'000'000'000;

struct HfExportOptions {
  // Each file holds at most this many bytes (its header included), unless one tensor alone is
  // larger: that tensor gets a file of its own, as huggingface_hub's splitting does.
  uint64_t max_shard_bytes = kHfDefaultMaxShardBytes;
  // Floating tensors (F16, BF16, F32, F64) are cast to this floating dtype; others are kept.
  std::optional<DType> dtype;
  // Only key paths that start with this are exported ("model."); empty: all.
  std::string prefix;
  // The prefix is removed from the exported names.
  bool strip_prefix = false;
  // An output directory that is not empty is refused unless this is set; then this export's names
  // are replaced (never written through) and the shards of an earlier export removed; other files
  // (config.json, the tokenizer) are left alone.
  bool overwrite = false;
  // Which rank's part of a checkpoint written by several ranks.
  int rank = 0;
  bool verify_checksums = true;
  int io_threads = 0;  // 0: one per core, at least 4
};

struct HfExportReport {
  std::vector<std::string> files;  // the safetensors files written, in order
  std::string index_file;          // kHfIndexFile, or empty for a single file
  uint64_t total_size = 0;         // tensor bytes, as the index's metadata.total_size
  size_t tensors = 0;
  // Values not exported, with why: a leaf that is not a tensor, a dtype safetensors lacks, a
  // tensor whose bytes are not its values (a lazy conjugate). Key paths outside the prefix are not
  // listed.
  std::vector<std::pair<std::string, std::string>> skipped;
  // The most bytes of sharded tensors held assembled at once: one file's, or one tensor's if larger.
  uint64_t peak_sharded_bytes = 0;
};

// Note [Tied weights in an export]
// Key paths whose tensors are the same view of one storage (tied weights: an LM head that is the
// embedding) are exported once, under the first key path in tree order, and the others listed in
// `skipped`, as transformers' save_pretrained drops its tied keys (safetensors refuses shared
// tensors); a model whose config ties them re-ties them on load, and load_hugging_face into a
// template whose tensors are tied fills them all from whichever name the files hold (as
// safetensors' load_model). Other views of one storage (disjoint slices, a transpose) are
// exported each with its own values.

// Writes `out` (created if missing) from the committed checkpoint at `checkpoint`.
HfExportReport export_hugging_face(const std::string& checkpoint, const std::string& out,
                                   const HfExportOptions& options = {});

struct HfImportOptions {
  // Names in the files that start with `strip_prefix` lose it; then `add_prefix` is prepended.
  // The result is matched against the target's key paths.
  std::string strip_prefix;
  std::string add_prefix;
  // Missing keys (in the target, not in the files) or unexpected ones (in the files, not in the
  // target) are an error, raised before anything in the target changes.
  bool strict = true;
  // A floating tensor stored under another floating dtype than its target's is cast (BF16 weights
  // into an F32 model); without, a dtype mismatch is an error.
  bool cast = false;
  // Without a target: floating tensors are loaded as this dtype; others as stored.
  std::optional<DType> dtype;
  int io_threads = 0;  // 0: one per core, at least 4
};

// Fills the tensors of `target` in place: plain tensors receive the whole stored tensor, sharded
// ones (ShardedTensor) each of their chunks' boxes. `path` is a model directory, its index file
// or one safetensors file. Other leaves of the target are left alone and not counted as keys.
LoadResult load_hugging_face(const std::string& path, Value& target, const HfImportOptions& options = {});

// The files' tensors as a flat dict of their (mapped) names.
Value read_hugging_face(const std::string& path, const HfImportOptions& options = {});

namespace hf {

// "5GB" (decimal units, as transformers: KB, MB, GB, TB), "5GiB" (binary: KiB, MiB, GiB, TiB) or
// a plain number of bytes; Error(kInvalidArgument) naming `option` otherwise.
uint64_t parse_size(std::string_view text, std::string_view option);
// "bf16", "bfloat16", "BF16", "f16", "fp16", "float16", "half", "f32", "float", "float32",
// "f64", "double", "float64": one of the floating dtypes a cast goes to; else Error(kInvalidArgument).
DType parse_float_dtype(std::string_view text, std::string_view option);
// Whether a cast applies to this dtype: F16, BF16, F32, F64.
bool is_castable_float(DType dtype) noexcept;
// Converts `n` elements between castable dtypes, rounding as torch's `.to(dtype)` does (to nearest,
// ties to even; F64 to a 16-bit type goes through F32, as torch).
void cast_elements(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t n);
// The shards that huggingface_hub's splitting makes: items in order, each shard's cost (`base` plus
// its items' costs) at most `max_cost`, a new shard started when the next item would exceed it; an
// item that exceeds it alone gets a shard of its own. Returns the first item of each shard.
std::vector<size_t> plan_shards(const std::vector<uint64_t>& costs, uint64_t base, uint64_t max_cost);
// "model-00001-of-00003.safetensors".
std::string shard_file_name(size_t index, size_t count);

}  // namespace hf
}  // namespace fastdcp
