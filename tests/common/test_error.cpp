// fastdcp::Error: the errno behind an I/O error, and what a thread that cannot start says.

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "fastdcp/common/error.h"
#include "fastdcp/common/parallel.h"

namespace fastdcp {
namespace {

TEST(Error, SystemErrorsCarryTheirErrno) {
  try {
    throw_system_error("cannot write 'x'", ENOSPC);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kIoError);
    EXPECT_EQ(e.errnum(), ENOSPC);  // Python raises OSError(ENOSPC, ...) from it
    EXPECT_NE(std::string(e.what()).find("No space left on device"), std::string::npos) << e.what();
  }
  EXPECT_EQ(Error(ErrorCode::kDataLoss, "corrupt").errnum(), 0);
}

// Under `ulimit -v`, a thread whose stack does not fit is refused with EAGAIN: the error names the
// thread, the stack it reserves and the limit to raise (in a child: the limit is for good).
TEST(Error, AThreadThatCannotStartSaysWhyAndWhatToChange) {
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // 2 MiB more than is in use: small allocations still fit, no new 8 MiB stack does.
    std::ifstream status("/proc/self/status");
    std::string line;
    uint64_t in_use_kib = 0;
    while (std::getline(status, line)) {
      if (line.starts_with("VmSize:")) in_use_kib = std::stoull(line.substr(7));
    }
    rlimit limit{};
    ::getrlimit(RLIMIT_AS, &limit);
    limit.rlim_cur = (in_use_kib << 10) + (2 << 20);
    if (in_use_kib == 0 || ::setrlimit(RLIMIT_AS, &limit) != 0) ::_exit(4);
    // Stacks that glibc cached from earlier threads need no new mapping: use them up first.
    std::vector<std::thread> started;
    try {
      for (int i = 0; i < 1000; ++i) started.push_back(start_thread("test", [] { ::pause(); }));
      ::_exit(2);
    } catch (const Error& e) {
      const std::string message = e.what();
      const bool ok = e.code() == ErrorCode::kResourceExhausted &&
                      message.starts_with("cannot start a test thread: Resource temporarily unavailable") &&
                      message.find("of address space for its stack") != std::string::npos &&
                      message.find("the address-space limit (ulimit -v) is " + std::to_string(limit.rlim_cur >> 20) +
                                   " MiB; raise it") != std::string::npos;
      ::_exit(ok ? 0 : 3);
    }
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0)
      << "2: the thread started; 3: the message lacks the thread, stack or limit; 4: no limit could be set";
}

}  // namespace
}  // namespace fastdcp
