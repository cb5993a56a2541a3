#pragma once
// Helpers shared by the C++ test suites: a temporary directory, and running code in a child
// process under a file-size limit.

#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <functional>
#include <string>

#include "fastdcp/common/error.h"

namespace fastdcp::testing {

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

}  // namespace fastdcp::testing
