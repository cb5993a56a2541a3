#include "fastdcp/checkpoint/shared_state_dict.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <tuple>

#include "fastdcp/common/error.h"
#include "fastdcp/staging/stager.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

using testing::patterned_tensor;

Value model_state() {
  Tensor base = patterned_tensor(DType::kF32, {256, 128}, 1);
  Value sd = Value::dict();
  sd.insert("weight", base);
  sd.insert("weight_t", base.view_as({128, 256}, {1, 128}, 0));  // a view of the same storage
  sd.insert("big", patterned_tensor(DType::kBF16, {int64_t{3} << 20}, 2));
  sd.insert("empty", Tensor::empty_cpu(DType::kI64, {0}));
  Value opt = Value::list();
  opt.items().push_back(Value(int64_t{7}));
  opt.items().push_back(Value(std::string("adam")));
  sd.insert("optim", std::move(opt));
  return sd;
}

Value staged_in_shared_memory(DefaultStager& stager, const Value& sd) {
  return stager.stage_now(sd);
}

std::vector<int> dup_all(const std::vector<int>& fds) {
  std::vector<int> out;
  for (int fd : fds) out.push_back(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
  return out;
}

void expect_same_tree(const Value& got, const Value& want) {
  for (const char* key : {"weight", "weight_t", "big", "empty"}) {
    const Tensor& a = got.at(key).as_tensor();
    const Tensor& b = want.at(key).as_tensor();
    EXPECT_EQ(a.dtype(), b.dtype()) << key;
    EXPECT_EQ(a.shape(), b.shape()) << key;
    EXPECT_EQ(a.strides(), b.strides()) << key;
    if (b.nbytes()) EXPECT_EQ(std::memcmp(a.storage().data(), b.storage().data(), b.storage().nbytes()), 0) << key;
  }
  EXPECT_EQ(got.at("weight").as_tensor().storage(), got.at("weight_t").as_tensor().storage());
  EXPECT_EQ(got.at("optim").items()[0].as_int(), 7);
  EXPECT_EQ(got.at("optim").items()[1].as_string(), "adam");
}

TEST(SharedStateDict, StagedSharedBuffersTravelWithoutACopy) {
  DefaultStager stager(testing::cpu_staging(/*async=*/false, /*shared=*/true), CudaRuntime::unavailable("CPU-only test"));
  const Value sd = model_state();
  const Value staged = staged_in_shared_memory(stager, sd);
  const SharedStateDict shared = share_state_dict(staged);
  EXPECT_EQ(shared.bytes_copied, 0u);
  EXPECT_TRUE(shared.copies.empty());
  EXPECT_FALSE(shared.fds.empty());
  const Value attached = attach_state_dict(shared.message, dup_all(shared.fds));
  expect_same_tree(attached, sd);
  EXPECT_NE(attached.at("big").as_tensor().data_ptr(), staged.at("big").as_tensor().data_ptr());  // mapped anew
}

TEST(SharedStateDict, PrivateMemoryIsCopiedIntoAMemfdOnce) {
  const Value sd = model_state();
  const SharedStateDict shared = share_state_dict(sd);
  EXPECT_EQ(shared.bytes_copied, sd.at("weight").as_tensor().storage().nbytes() + sd.at("big").as_tensor().nbytes());
  ASSERT_EQ(shared.copies.size(), 1u);
  expect_same_tree(attach_state_dict(shared.message, dup_all(shared.fds)), sd);
}

TEST(SharedStateDict, TheReceiverCannotChangeTheSendersBuffers) {
  DefaultStager stager(testing::cpu_staging(/*async=*/false, /*shared=*/true), CudaRuntime::unavailable("CPU-only test"));
  const Value staged = staged_in_shared_memory(stager, model_state());
  const SharedStateDict shared = share_state_dict(staged);
  const Value attached = attach_state_dict(shared.message, dup_all(shared.fds));
  std::memset(attached.at("big").as_tensor().data_ptr(), 0, 4096);
  EXPECT_NE(static_cast<unsigned char*>(staged.at("big").as_tensor().data_ptr())[1], 0);
}

// The real use: another process receives the message and the memfds over a Unix socket.
TEST(SharedStateDict, AnotherProcessAttachesThroughSCMRights) {
  DefaultStager stager(testing::cpu_staging(/*async=*/false, /*shared=*/true), CudaRuntime::unavailable("CPU-only test"));
  const Value sd = model_state();
  const Value staged = staged_in_shared_memory(stager, sd);
  const SharedStateDict shared = share_state_dict(staged);
  int sockets[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sockets), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(sockets[0]);
    uint64_t size = 0;
    uint32_t nfds = 0;
    char cmsg_space[CMSG_SPACE(sizeof(int) * 64)];
    iovec iov[2] = {{&size, sizeof size}, {&nfds, sizeof nfds}};
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = 2;
    msg.msg_control = cmsg_space;
    msg.msg_controllen = sizeof cmsg_space;
    if (::recvmsg(sockets[1], &msg, MSG_WAITALL) != static_cast<ssize_t>(sizeof size + sizeof nfds)) ::_exit(2);
    std::vector<int> fds(nfds);
    const cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    if (!cmsg || cmsg->cmsg_len != CMSG_LEN(sizeof(int) * nfds)) ::_exit(3);
    std::memcpy(fds.data(), CMSG_DATA(cmsg), sizeof(int) * nfds);
    std::string message(size, '\0');
    if (::recv(sockets[1], message.data(), size, MSG_WAITALL) != static_cast<ssize_t>(size)) ::_exit(4);
    try {
      const Value attached = attach_state_dict(message, fds);
      const Tensor& big = attached.at("big").as_tensor();
      const Tensor want = patterned_tensor(DType::kBF16, {int64_t{3} << 20}, 2);
      const bool same = std::memcmp(big.data_ptr(), want.data_ptr(), want.nbytes()) == 0 &&
                        attached.at("weight").as_tensor().storage() == attached.at("weight_t").as_tensor().storage();
      ::_exit(same ? 0 : 5);
    } catch (...) {
      ::_exit(6);
    }
  }
  ::close(sockets[1]);
  uint64_t size = shared.message.size();
  uint32_t nfds = static_cast<uint32_t>(shared.fds.size());
  ASSERT_LE(nfds, 64u);
  char cmsg_space[CMSG_SPACE(sizeof(int) * 64)] = {};
  iovec iov[2] = {{&size, sizeof size}, {&nfds, sizeof nfds}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = 2;
  msg.msg_control = cmsg_space;
  msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
  cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
  std::memcpy(CMSG_DATA(cmsg), shared.fds.data(), sizeof(int) * nfds);
  ASSERT_EQ(::sendmsg(sockets[0], &msg, 0), static_cast<ssize_t>(sizeof size + sizeof nfds));
  ASSERT_EQ(::send(sockets[0], shared.message.data(), size, 0), static_cast<ssize_t>(size));
  int status = 0;
  ::waitpid(child, &status, 0);
  ::close(sockets[0]);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
}

TEST(SharedStateDict, MalformedMessagesAreClearErrorsAndCloseTheirFds) {
  const SharedStateDict shared = share_state_dict(model_state());
  auto expect_error = [&](std::string message, std::vector<int> fds, const std::string& what) {
    try {
      attach_state_dict(message, fds);
      ADD_FAILURE() << "no error for " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
    for (int fd : fds) EXPECT_EQ(::fcntl(fd, F_GETFD), -1) << "fd " << fd << " left open";
  };
  expect_error("not a message at all", dup_all(shared.fds), "magic");
  expect_error(shared.message.substr(0, 30), dup_all(shared.fds), "truncated");
  expect_error(shared.message, {}, "file descriptor 0 of 0");
  // A memfd smaller than the entries it should hold.
  std::vector<int> small{::memfd_create("small", MFD_CLOEXEC)};
  expect_error(shared.message, small, "outside its memfd");
}


// ---- the writer writes the plan the sender rendered (Note [Shared state dicts]) ----------------

// A sharded leaf of `rows` x 6 floats held as two chunks (its top and bottom rows), views of one
// local storage.
ShardedTensor two_chunks(int64_t rows, int seed, int replica_index, int replica_count) {
  const Tensor local = patterned_tensor(DType::kF32, {rows * 6}, seed);
  ShardedTensor s;
  s.global_shape = Dims{rows, 6};
  s.dtype = DType::kF32;
  const int64_t top = rows / 2;
  s.chunks.push_back({Dims{0, 0}, local.view_as({top, 6}, {6, 1}, 0)});
  s.chunks.push_back({Dims{top, 0}, local.view_as({rows - top, 6}, {6, 1}, top * 6)});
  s.replica_index = replica_index;
  s.replica_count = replica_count;
  return s;
}

// Everything a tree may hold: views of one storage, an empty tensor, a large tensor of two
// checksum chunks, non-tensor values, a tensor with traits and sharded leaves, replicated
// `replica_count` times, of which this rank holds copy `replica_index`. With two replicas, each
// writes one of the two equal leaves (Note [Writing replicas]).
Value mixed_state(int replica_index, int replica_count) {
  Value sd = model_state();
  Tensor param = patterned_tensor(DType::kBF16, {3, 5}, 9);
  param.set_traits(TensorTraits{.requires_grad = true, .parameter = true});
  sd.insert("param", Value(param));
  sd.insert("blob", Value(Bytes{std::string("\x00\xff\x10", 3)}));
  sd.insert("nan", Value(std::nan("")));
  Value layers = Value::list();
  layers.items().push_back(Value(two_chunks(8, 3, replica_index, replica_count)));
  layers.items().push_back(Value(two_chunks(8, 4, replica_index, replica_count)));
  sd.insert("layers", std::move(layers));
  return sd;
}

RankFilePlan shared_plan(const Value& sd) {
  const SharedStateDict shared = share_state_dict(sd);
  return attach_plan(shared.message, dup_all(shared.fds));
}

TEST(SharedStateDict, TheWritersPlanIsTheOneADirectWriteMakes) {
  for (const auto& [index, count] : {std::pair{0, 1}, std::pair{0, 2}, std::pair{1, 2}}) {
    SCOPED_TRACE("replica " + std::to_string(index) + " of " + std::to_string(count));
    const Value sd = mixed_state(index, count);
    const RankFilePlan direct = RankFilePlan::make(sd);
    EXPECT_EQ(direct.omits_replicas(), count > 1);
    const RankFilePlan shared = shared_plan(sd);
    EXPECT_EQ(shared.header(), direct.header());
    EXPECT_EQ(shared.file_size(), direct.file_size());
    ASSERT_EQ(shared.entries().size(), direct.entries().size());
    for (size_t i = 0; i < direct.entries().size(); ++i) {
      const StoredEntry& a = shared.entries()[i];
      const StoredEntry& b = direct.entries()[i];
      EXPECT_EQ(a.name, b.name);
      EXPECT_EQ(std::tie(a.begin, a.end, a.nbytes), std::tie(b.begin, b.end, b.nbytes)) << a.name;
      ASSERT_GE(shared.storages()[i].nbytes(), b.nbytes);
      if (b.nbytes) EXPECT_EQ(std::memcmp(shared.storages()[i].data(), direct.storages()[i].data(), b.nbytes), 0) << a.name;
    }
    ASSERT_EQ(shared.sharded().size(), direct.sharded().size());
    for (size_t i = 0; i < direct.sharded().size(); ++i) {
      const IndexEntry& a = shared.sharded()[i];
      const IndexEntry& b = direct.sharded()[i];
      EXPECT_EQ(std::tie(a.key, a.dtype, a.global_shape), std::tie(b.key, b.dtype, b.global_shape));
      ASSERT_EQ(a.chunks.size(), b.chunks.size()) << a.key;
      for (size_t k = 0; k < a.chunks.size(); ++k) EXPECT_EQ(a.chunks[k].box(), b.chunks[k].box()) << a.key;
    }
  }
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(SharedStateDict, AWriteOfTheSharedPlanIsByteForByteADirectWrite) {
  testing::TempDir dir;
  DefaultStager stager(testing::cpu_staging(/*async=*/false, /*shared=*/true), CudaRuntime::unavailable("CPU-only test"));
  const Value sd = mixed_state(0, 1);
  const Value staged = staged_in_shared_memory(stager, sd);
  const WriteStats direct = CheckpointWriter().write(dir.path() + "/direct", sd);
  const WriteStats planned = CheckpointWriter().write(dir.path() + "/planned", shared_plan(staged));
  const std::string want = file_bytes(dir.path() + "/direct/" + direct.file);
  ASSERT_GT(want.size(), uint64_t{6} << 20);
  EXPECT_EQ(planned.bytes_written, want.size());
  EXPECT_TRUE(file_bytes(dir.path() + "/planned/" + planned.file) == want);
  EXPECT_EQ(read_manifest(dir.path() + "/planned").index.size(), 2u);
  const Value loaded = CheckpointReader().read(dir.path() + "/planned");
  expect_same_tree(loaded, sd);
  EXPECT_TRUE(loaded.at("param").as_tensor().traits().requires_grad);
}

// A replica's file leaves out the leaves another replica writes; a writer that takes the tree
// itself still gets every chunk.
TEST(SharedStateDict, AttachGivesEveryReplicasChunksWhereTheFileLeavesThemOut) {
  const Value sd = mixed_state(1, 2);
  const SharedStateDict shared = share_state_dict(sd);
  const Value attached = attach_state_dict(shared.message, dup_all(shared.fds));
  for (size_t leaf = 0; leaf < 2; ++leaf) {
    const ShardedTensor& got = attached.at("layers").items()[leaf].as_sharded();
    const ShardedTensor& want = sd.at("layers").items()[leaf].as_sharded();
    EXPECT_EQ(got.replica_index, 1);
    ASSERT_EQ(got.chunks.size(), 2u);
    for (size_t k = 0; k < 2; ++k) {
      EXPECT_EQ(got.chunks[k].box(), want.chunks[k].box());
      EXPECT_EQ(std::memcmp(got.chunks[k].data.data_ptr(), want.chunks[k].data.data_ptr(), want.chunks[k].data.nbytes()), 0);
    }
  }
  const RankFilePlan plan = attach_plan(shared.message, dup_all(shared.fds));
  ASSERT_EQ(plan.sharded().size(), 2u);
  EXPECT_EQ(plan.sharded()[0].chunks.size() + plan.sharded()[1].chunks.size(), 2u);  // one leaf of two
  expect_same_tree(attached, sd);
}

// Calls attach(message, fds) on copies of `fds` (closing `fds` after): it must throw an Error of
// `code` whose message contains `what`, and close every descriptor it was given.
template <class Attach>
void expect_refused(Attach&& attach, const std::string& message, const std::vector<int>& fds, ErrorCode code,
                    const std::string& what) {
  std::vector<int> copies = dup_all(fds);
  try {
    attach(message, copies);
    ADD_FAILURE() << "no error for " << what;
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  }
  for (int fd : copies) EXPECT_EQ(::fcntl(fd, F_GETFD), -1) << "fd " << fd << " left open";
}

// The message comes from another process: whatever it says, the writer refuses it with an error
// naming what is wrong, reads and writes nothing outside the memfds and the file's layout, and
// closes every descriptor.
TEST(SharedStateDict, CorruptPlansAreRefusedAndCloseTheirFds) {
  const SharedStateDict shared = share_state_dict(mixed_state(0, 1));  // one section: the file is the tree
  const std::string& good = shared.message;
  uint64_t data_size, count, extras_size;
  std::memcpy(&data_size, good.data() + 8, 8);
  std::memcpy(&count, good.data() + 24, 8);
  const size_t table_at = 32;
  constexpr size_t kRecord = 48;  // fd index, name size, offset, begin, end, nbytes, dtype, rank, 6 spare
  const size_t extras_at = table_at + count * kRecord;
  std::memcpy(&extras_size, good.data() + extras_at, 8);
  const size_t header_at = extras_at + 8 + extras_size;
  ASSERT_EQ(good.compare(header_at + 8, 15, "{\"__metadata__\""), 0);
  auto with = [&](size_t at, std::string_view bytes) {
    std::string m = good;
    m.replace(at, bytes.size(), bytes);
    return m;
  };
  auto as_bytes = [](const auto& value) { return std::string_view(reinterpret_cast<const char*>(&value), sizeof value); };
  auto field = [&](size_t entry, size_t at) { return table_at + entry * kRecord + at; };
  auto get = [&](size_t at) {
    uint64_t v;
    std::memcpy(&v, good.data() + at, 8);
    return v;
  };
  // Refused by the writer of a plan; `tree_too`: by the writer of a tree as well.
  auto expect_error = [&](const std::string& message, ErrorCode code, const std::string& what, bool tree_too = true,
                          std::vector<int> fds = {}) {
    if (fds.empty()) fds = dup_all(shared.fds);
    expect_refused([](std::string_view m, const std::vector<int>& f) { attach_plan(m, f); }, message, fds, code, what);
    if (tree_too) {
      expect_refused([](std::string_view m, const std::vector<int>& f) { attach_state_dict(m, f); }, message, fds, code,
                     what);
    }
    for (int fd : fds) ::close(fd);
  };
  const auto invalid = ErrorCode::kInvalidArgument;
  expect_error(good + "x", invalid, "a section is truncated");
  const uint64_t huge = ~uint64_t{0} - 4;
  expect_error(with(8, as_bytes(huge)), invalid, "data size is out of range");
  expect_error(with(24, as_bytes(huge)), invalid, "entry table is truncated");
  expect_error(with(extras_at, as_bytes(huge)), invalid, "extras are truncated");
  expect_error(with(header_at, as_bytes(uint64_t{good.size()})), invalid, "header is truncated");
  expect_error(with(field(0, 0), as_bytes(uint32_t{7})), invalid, "names file descriptor 7 of 1");
  expect_error(with(field(0, 8), as_bytes(uint64_t{1} << 40)), invalid, "outside its memfd");
  expect_error(good, invalid, "outside its memfd", true, {::memfd_create("small", MFD_CLOEXEC)});
  // The table and extras, which only the writer of a plan reads.
  expect_error(with(field(0, 4), as_bytes(uint32_t{1} << 30)), invalid, "extras are truncated", false);
  expect_error(with(field(0, 40), as_bytes(uint8_t{200})), invalid, "names dtype 200", false);
  expect_error(with(field(0, 41), as_bytes(uint8_t{65})), invalid, "65 dimensions", false);
  size_t sharded_at = extras_at + 8;  // past the names and shapes
  size_t plain = count;                // an entry that its bytes fill exactly
  for (size_t i = 0; i < count; ++i) {
    uint32_t name_size;
    std::memcpy(&name_size, good.data() + field(i, 4), 4);
    sharded_at += name_size + 8 * static_cast<uint8_t>(good[field(i, 41)]);
    if (get(field(i, 24)) - get(field(i, 16)) == get(field(i, 32)) && get(field(i, 32)) > 1) plain = i;
  }
  ASSERT_EQ(get(sharded_at), 2u);
  expect_error(with(sharded_at, as_bytes(uint64_t{3})), invalid, "extras are truncated", false);
  expect_error(with(sharded_at, as_bytes(huge)), invalid, "sharded index is truncated", false);
  expect_error(with(sharded_at, as_bytes(uint64_t{1})), invalid, "extras have trailing bytes", false);
  // A layout that would write outside the file's data, or over another entry's bytes.
  const auto data_loss = ErrorCode::kDataLoss;
  ASSERT_LT(plain, count);
  const uint64_t begin = get(field(plain, 16)), end = get(field(plain, 24)), nbytes = get(field(plain, 32));
  expect_error(with(field(plain, 16), as_bytes(begin + 1)), data_loss, "does not hold its bytes", false);
  expect_error(with(field(plain, 24), as_bytes(end - 1)), data_loss, "does not hold its bytes", false);
  expect_error(with(field(plain, 16), as_bytes(begin + 1)).replace(field(plain, 24), 8, as_bytes(end + 1)), data_loss,
               "does not start where the one before it ends", false);
  expect_error(with(field(plain, 16), as_bytes(huge)).replace(field(plain, 24), 8, as_bytes(huge + nbytes)), data_loss,
               "does not hold its bytes", false);  // wraps around
  expect_error(with(8, as_bytes(data_size + 64)), data_loss, "do not fill its data size", false);
  expect_error(with(16, as_bytes(huge)), data_loss, "checksum table lies outside its header", false);
  expect_error(with(16, as_bytes(uint64_t{get(header_at)} + 8 - 7)), data_loss, "checksum table lies outside its header",
               false);
  // The header itself: the writer of a tree checks it as a load checks a file's.
  expect_refused([](std::string_view m, const std::vector<int>& f) { attach_state_dict(m, f); },
                 with(header_at + 8, "["), shared.fds, data_loss, "not valid JSON");
  const size_t offsets = good.find("\"data_offsets\":[0,", header_at);
  ASSERT_NE(offsets, std::string::npos);
  expect_refused([](std::string_view m, const std::vector<int>& f) { attach_state_dict(m, f); },
                 with(offsets + 16, "1"), shared.fds, data_loss, "for its shape and dtype");
}

// The writer of a plan writes its header without parsing it (Note [Trusting the plan]): a header
// that disagrees with its table makes a file that the load refuses, naming what is wrong.
TEST(SharedStateDict, AHeaderTheWriterDoesNotParseIsCheckedByTheLoad) {
  testing::TempDir dir;
  const SharedStateDict shared = share_state_dict(mixed_state(0, 1));
  std::string bad = shared.message;
  const size_t offsets = bad.find("\"data_offsets\":[0,");
  ASSERT_NE(offsets, std::string::npos);
  bad[offsets + 16] = '1';
  CheckpointWriter().write(dir.path() + "/c", attach_plan(bad, dup_all(shared.fds)));
  try {
    CheckpointReader().read(dir.path() + "/c");
    ADD_FAILURE() << "a header that disagrees with its data loaded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss) << e.what();
    EXPECT_NE(std::string(e.what()).find("for its shape and dtype"), std::string::npos) << e.what();
  }
}

// With two sections, a writer that takes the tree reads the second one.
TEST(SharedStateDict, TheWholeTreeSectionIsCheckedToo) {
  const SharedStateDict shared = share_state_dict(mixed_state(1, 2));
  const size_t file_json = shared.message.find("{\"__metadata__\"");
  const size_t tree_json = shared.message.find("{\"__metadata__\"", file_json + 1);
  ASSERT_NE(tree_json, std::string::npos);
  std::string bad = shared.message;
  bad[tree_json] = '[';
  expect_refused([](std::string_view m, const std::vector<int>& f) { attach_state_dict(m, f); }, bad, shared.fds,
                 ErrorCode::kDataLoss, "not valid JSON");
}

}  // namespace
}  // namespace fastdcp
