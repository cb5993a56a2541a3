// A custom writer program for the checkpointer tests: fastdcp's writer process whose pre_commit
// sleeps $SLOW_WRITER_MS for paths that contain "slow", and whose start sleeps
// $SLOW_WRITER_INIT_MS: a write or a start that takes long, on demand.
#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>

#include "fastdcp/checkpoint/checkpointer.h"

namespace {

int env_ms(const char* name) {
  const char* value = std::getenv(name);
  return value ? std::atoi(value) : 0;
}

struct SlowHook : fastdcp::WriterHook {
  void pre_commit(const std::string& path) override {
    if (path.find("slow") != std::string::npos) {
      std::this_thread::sleep_for(std::chrono::milliseconds(env_ms("SLOW_WRITER_MS")));
    }
  }
  void post_commit(const std::string&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  fastdcp::WriterProcessSetup setup;
  setup.init = [] { std::this_thread::sleep_for(std::chrono::milliseconds(env_ms("SLOW_WRITER_INIT_MS"))); };
  setup.hook = std::make_shared<SlowHook>();
  return fastdcp::run_writer_process(std::atoi(argv[2]), setup);
}
