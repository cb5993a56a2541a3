// fastdcp-writer: the native writer process that CheckpointProcess starts (Note [Native writer
// process] in fastdcp/checkpoint/checkpointer.h). Usage: fastdcp-writer --socket FD
#include <cstdio>
#include <cstdlib>
#include <string>

#include "fastdcp/checkpoint/checkpointer.h"

int main(int argc, char** argv) {
  if (argc != 3 || std::string(argv[1]) != "--socket") {
    std::fprintf(stderr,
                 "usage: %s --socket FD\n"
                 "fastdcp's checkpoint writer process; started by fastdcp::CheckpointProcess, not by hand.\n",
                 argv[0]);
    return 2;
  }
  return fastdcp::run_writer_process(std::atoi(argv[2]));
}
