#pragma once
// Handing a staged state dict to another process (the background writer) without copying or
// serializing a byte of tensor data.
//
// Note [Shared state dicts]
// The tree travels as the rank file's plan (RankFilePlan), rendered once, by the sender: its header
// is the very JSON the data file will carry (docs/format.md), with a binary table that gives, for
// each of the header's entries, its place in the file, its name and shape, and the memfd and the
// offset in it that hold its bytes, and the plan's sharded index. The writer process writes that
// plan as it is (attach_plan, CheckpointWriter::write of a plan) from the table: it checks every
// entry against its memfd and the layout (Note [Trusting the plan]), but neither parses the header
// nor builds a tree nor renders anything again, which for 100,000 small tensors was most of a
// save's time. A writer that takes the tree (attach_state_dict) parses the header as a load does. A rank file
// leaves the chunks of replicated sharded leaves to the replica that writes them (Note [Writing
// replicas]); when it leaves any out, a second plan of the whole tree follows, for writers that
// take the tree itself (attach_state_dict). The memfds travel beside the message (SCM_RIGHTS over a
// Unix socket). Staged buffers in fastdcp's shared memory go
// as they are; any other storage is first copied into one memfd owned by the SharedStateDict. The
// receiver maps each memfd privately (copy-on-write: a writer that scribbles on its tensors cannot
// change the sender's buffers) and closes it at once, so an attached tree holds mappings, not
// file descriptors.

#include <string>
#include <string_view>
#include <vector>

#include "fastdcp/format/rank_file.h"
#include "fastdcp/memory/host_buffer.h"
#include "fastdcp/tensor/value.h"

namespace fastdcp {

struct SharedStateDict {
  SharedStateDict() = default;
  SharedStateDict(SharedStateDict&&) = default;  // move-only: it owns `copies`
  SharedStateDict& operator=(SharedStateDict&&) = default;

  std::string message;
  // Borrowed from the staged buffers (and from `copies`): valid while they live, so the sender
  // keeps the staged tree alive until the receiver has attached.
  std::vector<int> fds;
  std::vector<HostBuffer> copies;  // storages that were not in shared memory
  uint64_t bytes_copied = 0;
};

// Describes `staged` (CPU tensors only) for attach_state_dict in another process. Throws
// Error(kInvalidArgument) naming the key path of a value the checkpoint format cannot hold.
SharedStateDict share_state_dict(const Value& staged);

// Builds the tree of a share_state_dict message over the memfds `fds`, which it takes over and
// closes (also on error). Throws Error(kInvalidArgument) for a malformed message, Error(kDataLoss)
// for a header that does not parse.
Value attach_state_dict(std::string_view message, const std::vector<int>& fds);

// The rank-file plan of a share_state_dict message, over the memfds `fds` (taken over as above),
// for CheckpointWriter::write: what a write of the shared tree itself would write, byte for byte.
// Throws Error(kInvalidArgument) for a malformed message, Error(kDataLoss) for a plan whose layout
// would write outside its bounds (RankFilePlan::adopt).
RankFilePlan attach_plan(std::string_view message, const std::vector<int>& fds);

}  // namespace fastdcp
