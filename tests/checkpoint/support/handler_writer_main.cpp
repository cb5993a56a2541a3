// A writer program with its own handler (WriterProcessSetup::make_handler), for the protocol tests:
// argv is "--tag TAG --socket FD". A write records "<tag>|<init blob>|<call args>" in <path>.args,
// or fails as its call args say: "enospc" with Error(kIoError, ENOSPC), "carry" with a
// CarriedError whose blob is "BLOB". A vote against a save records "<error>|<call args>" in
// <path>.abandoned.
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "fastdcp/checkpoint/checkpointer.h"

namespace {

class RecordingHandler final : public fastdcp::WriterProcessHandler {
 public:
  RecordingHandler(std::string tag, std::string init_blob) : tag_(std::move(tag)), init_blob_(std::move(init_blob)) {}
  fastdcp::WriteStats write(const std::string& path, fastdcp::SharedWrite&, const std::string& call_args) override {
    if (call_args == "enospc") throw fastdcp::Error(fastdcp::ErrorCode::kIoError, "no room for " + path, ENOSPC);
    if (call_args == "carry") throw fastdcp::CarriedError(fastdcp::ErrorCode::kInvalidArgument, "carried", 0, "BLOB");
    std::ofstream(path + ".args") << tag_ << "|" << init_blob_ << "|" << call_args;
    fastdcp::WriteStats stats;
    stats.file = path + ".args";
    return stats;
  }
  void abandon(const std::string& path, const std::string& error, const std::string& call_args) override {
    std::ofstream(path + ".abandoned") << error << "|" << call_args;
  }

 private:
  std::string tag_, init_blob_;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5 || std::strcmp(argv[1], "--tag") != 0 || std::strcmp(argv[3], "--socket") != 0) return 2;
  const std::string tag = argv[2];
  fastdcp::WriterProcessSetup setup;
  setup.make_handler = [tag](const fastdcp::WriterProcessInit& init) {
    return std::make_unique<RecordingHandler>(tag, init.blob);
  };
  return fastdcp::run_writer_process(std::atoi(argv[4]), setup);
}
