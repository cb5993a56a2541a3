#include "fastdcp/checkpoint/shared_state_dict.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

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

}  // namespace
}  // namespace fastdcp
