#pragma once
// Helpers shared by the C++ test suites: a temporary directory, running code in a child process
// under a file-size limit, patterned tensors and CPU-only staging options.

#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <gtest/gtest.h>

#include <barrier>
#include <filesystem>
#include <functional>
#include <string>

#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/common/error.h"
#include "fastdcp/staging/stager.h"
#include "fastdcp/tensor/tensor.h"

namespace fastdcp::testing {

// A CPU tensor whose bytes follow a pattern set by `seed`: tensors of other seeds differ.
inline Tensor patterned_tensor(DType dtype, Dims shape, int seed) {
  Tensor t = Tensor::empty_cpu(dtype, std::move(shape));
  auto* bytes = static_cast<unsigned char*>(t.data_ptr());
  for (uint64_t i = 0; i < t.nbytes(); ++i) bytes[i] = static_cast<unsigned char>(i * 13 + seed);
  return t;
}

// Staging options for a host without CUDA.
inline StagingOptions cpu_staging(bool async = false, bool shared = false) {
  StagingOptions o;
  o.use_pinned_memory = false;
  o.use_shared_memory = shared;
  o.use_async_staging = async;
  o.use_non_blocking_copy = false;
  return o;
}

// A barrier for n simulated ranks, threads of one process.
class ThreadBarrier : public Barrier {
 public:
  explicit ThreadBarrier(int n) : barrier_(n) {}
  void execute(std::chrono::milliseconds) override { barrier_.arrive_and_wait(); }

 private:
  std::barrier<> barrier_;
};

// A fresh directory under /tmp, removed with everything in it at the end of the scope.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "fastdcp_test") {
    std::string pattern = "/tmp/" + prefix + "_XXXXXX";
    path_ = ::mkdtemp(pattern.data());
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Runs `work` in a child process whose files may not grow beyond `limit_bytes` (RLIMIT_FSIZE
// applies to the whole process, so not in the test's own). True when `work` threw a
// fastdcp::Error that names the file-size limit.
inline bool fails_with_file_size_limit(uint64_t limit_bytes, const std::function<void()>& work) {
  const pid_t pid = ::fork();
  if (pid < 0) return false;
  if (pid == 0) {
    ::signal(SIGXFSZ, SIG_IGN);  // make the write fail with EFBIG instead of killing the child
    const rlimit limit{limit_bytes, limit_bytes};
    ::setrlimit(RLIMIT_FSIZE, &limit);
    try {
      work();
    } catch (const Error& e) {
      ::_exit(std::string(e.what()).find("file-size limit") != std::string::npos ? 0 : 2);
    }
    ::_exit(1);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// The fastdcp::Error that `f` throws; a test failure if it throws none.
template <class F>
Error expect_error(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "expected a fastdcp::Error";
  return Error(ErrorCode::kInternal, "none");
}

}  // namespace fastdcp::testing
