// The native writer process and the checkpointers; see Note [Native writer process].

#include "fastdcp/checkpoint/checkpointer.h"

#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <vector>

#include "fastdcp/checkpoint/shared_state_dict.h"
#include "fastdcp/common/error.h"
#include "fastdcp/common/logging.h"
#include "fastdcp/common/parallel.h"

extern char** environ;

namespace fastdcp {
namespace {

using Clock = std::chrono::steady_clock;

// ---- the wire: frames over a SOCK_STREAM Unix socket ---------------------------------------
// A frame is a FrameHeader, then `length` payload bytes. A frame's file descriptors ride on its
// header (SCM_RIGHTS), at most kFdsPerMessage per sendmsg; more follow in one-byte messages.
enum class Request : uint32_t { kInit = 1, kPing, kWrite, kTerminate, kAbandon };
constexpr uint32_t kFrameMagic = 0x46445752;  // "FDWR"
constexpr size_t kFdsPerMessage = 200;         // the kernel's limit is 253 (SCM_MAX_FD)

struct FrameHeader {
  uint32_t magic = kFrameMagic;
  uint32_t type = 0;
  uint64_t length = 0;
  uint32_t fd_count = 0;
  uint32_t failed = 0;  // responses: the ErrorCode + 1 of the error in the payload; 0: success
};
// Payloads (strings are length-prefixed, put_string; "rest" is what follows):
//   kInit: InitPayload, rest: CheckpointProcessOptions::init_blob
//   kWrite: path, call_args, rest: the share_state_dict message; its memfds ride on the frame
//   kAbandon: path, error message, call_args
//   a failed reply: int32 errno, message, rest: a CarriedError's blob

struct Frame {
  FrameHeader header;
  std::string payload;
  std::vector<int> fds;  // owned by the receiver
};

// Both ends are one machine and one build: integers travel in native layout.
struct InitPayload {
  int32_t rank, world_size;
  int32_t io_threads;
  uint8_t overwrite, direct_io, io_engine, reserved;
  int64_t barrier_timeout_ms;
};
struct WriteResult {
  uint64_t bytes_written;
  double seconds_data, seconds_total;
};

void send_all(int socket, const void* data, size_t n) {
  auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t sent = ::send(socket, p, n, MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR) continue;
      throw_system_error("sending to the checkpoint writer", errno);
    }
    p += sent;
    n -= static_cast<size_t>(sent);
  }
}

void send_with_fds(int socket, const void* data, size_t n, const int* fds, size_t count) {
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kFdsPerMessage)] = {};
  iovec iov{const_cast<void*>(data), n};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (count > 0) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * count);
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * count);
    std::memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * count);
  }
  ssize_t sent;
  do {
    sent = ::sendmsg(socket, &msg, MSG_NOSIGNAL);
  } while (sent < 0 && errno == EINTR);
  if (sent < 0) throw_system_error("sending to the checkpoint writer", errno);
  if (static_cast<size_t>(sent) < n) send_all(socket, static_cast<const char*>(data) + sent, n - sent);
}

void send_frame(int socket, Request type, const std::string& payload, const std::vector<int>& fds = {},
                std::optional<ErrorCode> error = std::nullopt) {
  FrameHeader header;
  header.type = static_cast<uint32_t>(type);
  header.length = payload.size();
  header.fd_count = static_cast<uint32_t>(fds.size());
  header.failed = error ? static_cast<uint32_t>(*error) + 1 : 0;
  const size_t first = std::min(fds.size(), kFdsPerMessage);
  send_with_fds(socket, &header, sizeof header, fds.data(), first);
  for (size_t at = first; at < fds.size(); at += kFdsPerMessage) {
    const char marker = 'F';
    send_with_fds(socket, &marker, 1, fds.data() + at, std::min(kFdsPerMessage, fds.size() - at));
  }
  send_all(socket, payload.data(), payload.size());
}

// Receives exactly n bytes and any descriptors riding on them. False on a clean end of stream
// before the first byte.
bool receive_with_fds(int socket, void* data, size_t n, std::vector<int>& fds) {
  auto* p = static_cast<char*>(data);
  size_t got = 0;
  while (got < n) {
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kFdsPerMessage)];
    iovec iov{p + got, n - got};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t r = ::recvmsg(socket, &msg, MSG_CMSG_CLOEXEC);
    if (r < 0) {
      if (errno == EINTR) continue;
      throw_system_error("receiving from the checkpoint writer connection", errno);
    }
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const auto* received = reinterpret_cast<const int*>(CMSG_DATA(c));
        fds.insert(fds.end(), received, received + count);
      }
    }
    if (r == 0) {
      if (got == 0) return false;
      throw Error(ErrorCode::kIoError, "the checkpoint writer connection closed in the middle of a message");
    }
    got += static_cast<size_t>(r);
  }
  return true;
}

// False on a clean end of stream.
bool receive_frame(int socket, Frame& frame) {
  frame.fds.clear();
  try {
    if (!receive_with_fds(socket, &frame.header, sizeof frame.header, frame.fds)) return false;
    if (frame.header.magic != kFrameMagic) throw Error(ErrorCode::kInternal, "a checkpoint writer frame is corrupt");
    while (frame.fds.size() < frame.header.fd_count) {
      char marker;
      if (!receive_with_fds(socket, &marker, 1, frame.fds)) {
        throw Error(ErrorCode::kIoError, "the checkpoint writer connection closed in the middle of a message");
      }
    }
    frame.payload.resize(frame.header.length);
    if (frame.header.length > 0 && !receive_with_fds(socket, frame.payload.data(), frame.payload.size(), frame.fds)) {
      throw Error(ErrorCode::kIoError, "the checkpoint writer connection closed in the middle of a message");
    }
  } catch (...) {
    for (int fd : frame.fds) ::close(fd);
    frame.fds.clear();
    throw;
  }
  return true;
}

template <class T>
std::string pod_bytes(const T& value) {
  return std::string(reinterpret_cast<const char*>(&value), sizeof value);
}

void put_string(std::string& out, std::string_view s) {
  out += pod_bytes(static_cast<uint64_t>(s.size()));
  out += s;
}

// Takes a length-prefixed string off the front of `in`.
std::string take_string(std::string_view& in) {
  uint64_t n = 0;
  if (in.size() < sizeof n) throw Error(ErrorCode::kInternal, "a checkpoint writer message is truncated");
  std::memcpy(&n, in.data(), sizeof n);
  in.remove_prefix(sizeof n);
  if (n > in.size()) throw Error(ErrorCode::kInternal, "a checkpoint writer message is truncated");
  std::string out(in.substr(0, n));
  in.remove_prefix(n);
  return out;
}

std::string error_payload(int errnum, const std::string& message, const std::string& blob) {
  std::string out = pod_bytes(static_cast<int32_t>(errnum));
  put_string(out, message);
  return out + blob;
}

// "5", "0.25": a timeout in seconds, as the Python API spells it.
std::string seconds_text(std::chrono::milliseconds ms) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", static_cast<double>(ms.count()) / 1000.0);
  return text;
}

template <class T>
T pod_from(const std::string& bytes) {
  if (bytes.size() != sizeof(T)) throw Error(ErrorCode::kInternal, "a checkpoint writer message has the wrong size");
  T value;
  std::memcpy(&value, bytes.data(), sizeof value);
  return value;
}

std::string describe_exit(int status) {
  if (WIFSIGNALED(status)) {
    const char* name = sigabbrev_np(WTERMSIG(status));
    return std::string("it was killed by ") + (name ? std::string("SIG") + name : "signal " + std::to_string(WTERMSIG(status)));
  }
  if (WIFEXITED(status)) return "it exited with status " + std::to_string(WEXITSTATUS(status));
  return "it ended";
}

// $FASTDCP_WRITER, else the writer built with this library if it is still there, else
// fastdcp-writer on the PATH (an installed library).
std::string default_writer_executable() {
  if (const char* env = std::getenv("FASTDCP_WRITER"); env && *env) return env;
#ifdef FASTDCP_WRITER_PATH
  if (::access(FASTDCP_WRITER_PATH, X_OK) == 0) return FASTDCP_WRITER_PATH;
#endif
  return "fastdcp-writer";
}


// ---- the writer process -------------------------------------------------------------------------

// The default handler: fastdcp's own writer, with the setup's hook and barrier.
class NativeWriterHandler final : public WriterProcessHandler {
 public:
  NativeWriterHandler(const WriterProcessInit& init, const WriterProcessSetup& setup)
      : writer_(init.rank, init.writer, setup.barrier, setup.hook) {}
  WriteStats write(const std::string& path, SharedWrite& shared, const std::string&) override {
    return writer_.write(path, attach_plan(shared.message(), shared.take_fds()));
  }
  void abandon(const std::string& path, const std::string& error, const std::string&) override {
    writer_.abandon(path, error);
  }

 private:
  CheckpointWriter writer_;
};

}  // namespace

SharedWrite::~SharedWrite() {
  for (int fd : fds_) ::close(fd);
}

int run_writer_process(int socket_fd, const WriterProcessSetup& setup) {
  ::signal(SIGINT, SIG_IGN);  // Ctrl-C reaches the whole process group; the trainer decides
  std::unique_ptr<WriterProcessHandler> handler;
  Frame frame;
  for (;;) {
    try {
      if (!receive_frame(socket_fd, frame)) return 0;  // the trainer is gone
    } catch (const std::exception& e) {
      std::fprintf(stderr, "fastdcp-writer: %s\n", e.what());
      return 1;
    }
    const auto type = static_cast<Request>(frame.header.type);
    std::string reply;
    std::optional<ErrorCode> error;
    try {
      std::string_view payload(frame.payload);
      if (type != Request::kInit && type != Request::kPing && !handler) {
        throw Error(ErrorCode::kFailedPrecondition, "the checkpoint writer was not initialized");
      }
      switch (type) {
        case Request::kInit: {
          if (payload.size() < sizeof(InitPayload)) throw Error(ErrorCode::kInternal, "an init request is truncated");
          const auto init = pod_from<InitPayload>(frame.payload.substr(0, sizeof(InitPayload)));
          WriterProcessInit what{RankInfo{init.rank, init.world_size}, WriterOptions{},
                                 frame.payload.substr(sizeof(InitPayload))};
          what.writer.overwrite = init.overwrite != 0;
          what.writer.io_threads = init.io_threads;
          what.writer.direct_io = init.direct_io != 0;
          what.writer.io_engine = static_cast<IoEngine>(init.io_engine);
          what.writer.barrier_timeout = std::chrono::milliseconds(init.barrier_timeout_ms);
          if (setup.init) setup.init();
          handler = setup.make_handler ? setup.make_handler(what) : std::make_unique<NativeWriterHandler>(what, setup);
          if (!handler) throw Error(ErrorCode::kInternal, "the writer process's setup made no handler");
          break;
        }
        case Request::kPing: break;
        case Request::kWrite: {
          const std::string path = take_string(payload);
          const std::string call_args = take_string(payload);
          std::vector<int> fds = std::move(frame.fds);
          frame.fds.clear();
          SharedWrite shared(payload, std::move(fds));
          const WriteStats stats = handler->write(path, shared, call_args);
          reply = pod_bytes(WriteResult{stats.bytes_written, stats.seconds_data, stats.seconds_total}) + stats.file;
          break;
        }
        case Request::kAbandon: {
          const std::string path = take_string(payload);
          const std::string message = take_string(payload);
          handler->abandon(path, message, take_string(payload));
          break;
        }
        case Request::kTerminate:
          if (handler) handler->close();
          send_frame(socket_fd, type, {});
          return 0;
      }
    } catch (const CarriedError& e) {
      error = e.code();  // this request failed; the writer goes on
      reply = error_payload(e.errnum(), e.what(), e.blob());
    } catch (const Error& e) {
      error = e.code();
      reply = error_payload(e.errnum(), e.what(), {});
    } catch (const std::exception& e) {
      error = ErrorCode::kInternal;
      reply = error_payload(0, e.what(), {});
    }
    for (int fd : frame.fds) ::close(fd);
    frame.fds.clear();
    try {
      send_frame(socket_fd, type, reply, {}, error);
    } catch (const std::exception&) {
      return 0;  // the trainer is gone
    }
    if (type == Request::kTerminate) return 0;  // a close() that failed: reported, and done
  }
}


// ---- CheckpointProcess ----------------------------------------------------------------------

// One running writer: its process and our end of its socket. Destruction kills what is left.
struct CheckpointProcess::Worker {
  pid_t pid = 0;
  int socket = -1;
  bool reaped = false;
  int status = 0;

  ~Worker() {
    if (socket >= 0) ::close(socket);
    if (pid > 0 && !reaped) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
    }
  }

  // Waits up to `timeout` for the process to end; true when it did.
  bool wait_exit(std::chrono::milliseconds timeout) {
    const auto deadline = Clock::now() + timeout;
    for (;;) {
      const pid_t r = ::waitpid(pid, &status, WNOHANG);
      if (r == pid) {
        reaped = true;
        return true;
      }
      if (Clock::now() >= deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }

  std::string why_gone() {
    if (!reaped) wait_exit(std::chrono::seconds(1));
    return reaped ? describe_exit(status) : "it stopped answering";
  }

  // Waits for the reply to a request (which may report the writer's own error: header.failed);
  // throws when there is none in time or the writer is gone.
  Frame await_reply(std::chrono::milliseconds timeout, const std::string& what) {
    pollfd p{socket, POLLIN, 0};
    const auto deadline = Clock::now() + timeout;
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      const int r = ::poll(&p, 1, static_cast<int>(std::clamp<int64_t>(left.count(), 0, 1000)));
      if (r > 0) break;
      if (r < 0 && errno != EINTR) throw_system_error("waiting for the checkpoint writer", errno);
      if (Clock::now() >= deadline) {
        throw Error(ErrorCode::kDeadlineExceeded, "the checkpoint writer process did not finish " + what +
                                                      " within " + seconds_text(timeout) + "s");
      }
    }
    Frame reply;
    bool got = false;
    try {
      got = receive_frame(socket, reply);
    } catch (const Error&) {
    }
    if (!got) {
      throw Error(ErrorCode::kUnavailable,
                  "the checkpoint writer process terminated unexpectedly while " + what + ": " + why_gone());
    }
    for (int fd : reply.fds) ::close(fd);
    return reply;
  }
};

namespace {

// The writer's own error, as it reported it: code, errno, message and any carried blob. Always a
// CarriedError, so that callers can tell the writer's errors from the trainer's own.
void throw_if_failed(const Frame& reply) {
  if (!reply.header.failed) return;
  const auto code = static_cast<ErrorCode>(reply.header.failed - 1);
  std::string_view payload(reply.payload);
  int32_t errnum = 0;
  if (payload.size() < sizeof errnum) throw Error(ErrorCode::kInternal, "a checkpoint writer reply is truncated");
  std::memcpy(&errnum, payload.data(), sizeof errnum);
  payload.remove_prefix(sizeof errnum);
  const std::string message = take_string(payload);
  throw CarriedError(code, message, errnum, std::string(payload));
}

}  // namespace

CheckpointProcess::CheckpointProcess(RankInfo rank, WriterOptions writer, CheckpointProcessOptions options)
    : rank_(rank), writer_(writer), options_(std::move(options)) {
  if (options_.writer_executable.empty()) options_.writer_executable = default_writer_executable();
  comms_ = start_thread("checkpoint writer connection", [this] { comms_loop(); });
  // The writer starts now, in the background, like upstream's; its failure goes to the first write.
  Promise<WriteStats> start;
  started_future_ = start.get_future().then([](const WriteStats&) {});
  std::lock_guard lock(mutex_);
  queue_.push_back(Job{Future<Value>(), std::string(), std::string(), std::move(start)});
  queue_cv_.notify_one();
}

CheckpointProcess::~CheckpointProcess() { close(); }

void CheckpointProcess::ensure_worker() {
  if (worker_) {
    if (!worker_->reaped && ::waitpid(worker_->pid, &worker_->status, WNOHANG) == 0) return;
    drop_worker();
  }
  if (started_) {
    ++restarts_;
    warn("restarting the checkpoint writer process of rank " + std::to_string(rank_.global_rank));
  }
  int sockets[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sockets) != 0) {
    throw_system_error("socketpair for the checkpoint writer", errno);
  }
  auto worker = std::make_unique<Worker>();
  worker->socket = sockets[0];
  // The child's end must survive exec: dup2 onto itself in the child clears FD_CLOEXEC.
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, sockets[1], sockets[1]);
  const std::string fd_arg = std::to_string(sockets[1]);
  std::vector<char*> argv{const_cast<char*>(options_.writer_executable.c_str())};
  for (const std::string& argument : options_.writer_arguments) argv.push_back(const_cast<char*>(argument.c_str()));
  argv.insert(argv.end(), {const_cast<char*>("--socket"), const_cast<char*>(fd_arg.c_str()), nullptr});
  pid_t pid = 0;
  const bool search_path = options_.writer_executable.find('/') == std::string::npos;
  const int err = (search_path ? ::posix_spawnp : ::posix_spawn)(&pid, options_.writer_executable.c_str(), &actions,
                                                                 nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(sockets[1]);  // so that a dead writer reads as end of stream at once
  if (err != 0) {
    throw Error(ErrorCode::kUnavailable, "cannot start the checkpoint writer '" + options_.writer_executable +
                                             "': " + std::strerror(err) +
                                             " (set CheckpointProcessOptions::writer_executable or $FASTDCP_WRITER)");
  }
  worker->pid = pid;
  worker_ = std::move(worker);
  pid_ = pid;
  const InitPayload init{rank_.global_rank,
                         rank_.global_world_size,
                         writer_.io_threads,
                         static_cast<uint8_t>(writer_.overwrite),
                         static_cast<uint8_t>(writer_.direct_io),
                         static_cast<uint8_t>(writer_.io_engine),
                         0,
                         static_cast<int64_t>(writer_.barrier_timeout.count())};
  try {
    send_frame(worker_->socket, Request::kInit, pod_bytes(init) + options_.init_blob);
    Frame reply;
    try {
      reply = worker_->await_reply(options_.init_timeout, "initializing");
    } catch (const Error& e) {
      if (e.code() != ErrorCode::kDeadlineExceeded) throw;
      // Upstream's words first, then ours.
      throw Error(ErrorCode::kDeadlineExceeded,
                  "Timed out after " + seconds_text(options_.init_timeout) +
                      "s waiting for checkpoint subprocess to initialize: " + e.what() +
                      " (subprocess_init_timeout_secs, CheckpointProcessOptions::init_timeout)");
    }
    throw_if_failed(reply);
  } catch (...) {
    drop_worker();  // kills a writer that is late or broken
    throw;
  }
  started_ = true;
}

void CheckpointProcess::comms_loop() {
  for (;;) {
    Job job;
    {
      std::unique_lock lock(mutex_);
      queue_cv_.wait(lock, [&] { return closing_ || !queue_.empty(); });
      if (queue_.empty()) return;
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    std::exception_ptr error;
    try {
      if (!job.staged.valid()) {
        ensure_worker();  // the start-up job
        job.promise.set_value(WriteStats{});
      } else {
        job.promise.set_value(run_write(job));
      }
    } catch (...) {
      error = std::current_exception();
    }
    // Published once this thread is out of the handler, whose hold on the exception would
    // otherwise end after the waiter may have dropped its own (and the waiter's reads of it would
    // race with its destruction here, as libstdc++'s count is invisible to TSan).
    if (error) job.promise.set_exception(std::move(error));
  }
}

// The writer never got this save: vote against it, so that no rank waits for this one. (Not once
// the request is sent: the writer may have voted already.) The writer process votes when it can:
// it also joins the save's barrier, which may live in the writer processes (one made there), where
// the other ranks wait for it. Otherwise this process votes, and such a barrier waits out its timeout.
void CheckpointProcess::vote_against(const Job& job, const std::string& error) {
  if (worker_) {
    std::string payload;
    put_string(payload, job.path);
    put_string(payload, error);
    put_string(payload, job.call_args);
    try {
      Frame reply;
      try {
        send_frame(worker_->socket, Request::kAbandon, payload);
        reply = worker_->await_reply(options_.write_timeout, "voting against '" + job.path + "'");
      } catch (const Error&) {
        drop_worker();
        throw;
      }
      throw_if_failed(reply);
      return;
    } catch (const std::exception& e) {
      warn("the writer process could not vote against the save to '" + job.path + "' (" + e.what() +
           "); voting from the trainer");
    }
  }
  try {
    CheckpointWriter(rank_, writer_).abandon(job.path, error);
  } catch (const std::exception& vote_error) {
    warn("could not vote against the save to '" + job.path + "': " + vote_error.what());
  }
}

WriteStats CheckpointProcess::run_write(Job& job) {
  SharedStateDict shared;
  try {
    shared = share_state_dict(job.staged.get());
  } catch (const std::exception& e) {
    try {
      ensure_worker();  // a writer votes where it can: one that died since is started again
    } catch (const std::exception&) {
    }
    vote_against(job, e.what());
    throw;
  }
  try {
    ensure_worker();
  } catch (const std::exception& e) {
    vote_against(job, e.what());
    throw;
  }
  std::string payload;
  put_string(payload, job.path);
  put_string(payload, job.call_args);
  payload += shared.message;
  Frame reply;
  try {
    send_frame(worker_->socket, Request::kWrite, payload, shared.fds);
    reply = worker_->await_reply(options_.write_timeout, "writing '" + job.path + "'");
  } catch (const Error& e) {
    drop_worker();  // dead or hung: killed; the next write starts a new one
    if (e.code() == ErrorCode::kDeadlineExceeded) {
      throw Error(ErrorCode::kDeadlineExceeded,
                  std::string(e.what()) + " (subprocess_write_timeout_secs=" + seconds_text(options_.write_timeout) +
                      ", CheckpointProcessOptions::write_timeout); it was killed and the next write starts a new one");
    }
    throw Error(ErrorCode::kUnavailable, std::string(e.what()) + "; the next write starts a new writer process");
  }
  throw_if_failed(reply);  // the writer's own error: it goes on serving
  const auto result = pod_from<WriteResult>(reply.payload.substr(0, sizeof(WriteResult)));
  WriteStats stats;
  stats.bytes_written = result.bytes_written;
  stats.seconds_data = result.seconds_data;
  stats.seconds_total = result.seconds_total;
  stats.file = reply.payload.substr(sizeof(WriteResult));
  return stats;
}

Future<WriteStats> CheckpointProcess::write(Future<Value> staged, std::string path, std::string call_args) {
  if (!staged.valid()) throw Error(ErrorCode::kInvalidArgument, "CheckpointProcess::write: the staged future is empty");
  storage::require_shared_between_processes(path, "the writer process");  // not mem://
  Job job{std::move(staged), std::move(path), std::move(call_args), Promise<WriteStats>()};
  Future<WriteStats> out = job.promise.get_future();
  {
    std::lock_guard lock(mutex_);
    if (closing_) throw Error(ErrorCode::kFailedPrecondition, "CheckpointProcess::write after close()");
    queue_.push_back(std::move(job));
  }
  queue_cv_.notify_one();
  return out;
}

void CheckpointProcess::close() {
  std::deque<Job> cancelled;
  {
    std::lock_guard lock(mutex_);
    if (closing_ && !comms_.joinable()) return;
    closing_ = true;
    // Queued jobs are cancelled (their promises fail when dropped), a start-up that has not run yet
    // included: no writer is started only to be stopped. The job in progress finishes.
    cancelled.swap(queue_);
  }
  cancelled.clear();
  queue_cv_.notify_all();
  if (comms_.joinable()) comms_.join();
  if (!worker_) return;
  try {
    send_frame(worker_->socket, Request::kTerminate, {});
    worker_->await_reply(options_.shutdown_timeout, "shutting down");
    worker_->wait_exit(options_.shutdown_timeout);
  } catch (const std::exception& e) {
    warn(std::string("the checkpoint writer process did not shut down cleanly: ") + e.what());
  }
  drop_worker();  // kills it if it is still there
}

void CheckpointProcess::drop_worker() {
  pid_ = 0;
  worker_.reset();
}

pid_t CheckpointProcess::pid() const { return pid_; }

int CheckpointProcess::restarts() const { return restarts_; }

// ---- checkpointers ------------------------------------------------------------------------------

SyncCheckpointer::SyncCheckpointer(CheckpointWriter writer, CheckpointReader reader)
    : writer_(std::move(writer)), reader_(std::move(reader)) {}

WriteStats SyncCheckpointer::save(const std::string& path, const Value& state_dict) {
  return writer_.write(path, state_dict);
}

Value SyncCheckpointer::load(const std::string& path) { return reader_.read(path); }

LoadResult SyncCheckpointer::load_into(const std::string& path, Value& target, bool strict) {
  return reader_.read_into(path, target, strict);
}

AsyncCheckpointer::AsyncCheckpointer(std::shared_ptr<DefaultStager> stager, std::shared_ptr<CheckpointProcess> process,
                                     CheckpointReader reader, int max_pending_saves)
    : stager_(std::move(stager)), process_(std::move(process)), reader_(std::move(reader)),
      max_pending_(max_pending_saves) {
  if (!process_) throw Error(ErrorCode::kInvalidArgument, "AsyncCheckpointer needs a process");
  if (max_pending_ < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                "max_pending_saves must be at least 1, not " + std::to_string(max_pending_saves));
  }
}

AsyncCheckpointer::~AsyncCheckpointer() { close(); }

// Back-pressure: at most `room_for` - 1 saves stay in flight (Note [Saves in flight]).
void AsyncCheckpointer::wait_for_room(int room_for) {
  for (;;) {
    Future<WriteStats> oldest;
    {
      std::lock_guard lock(mutex_);
      while (!pending_.empty() && pending_.front().second.ready()) pending_.pop_front();
      if (static_cast<int>(pending_.size()) < room_for) return;
      oldest = pending_.front().second;
    }
    oldest.wait();  // its error, if any, belongs to its own future
  }
}

void AsyncCheckpointer::add_pending(const std::string& path, const Future<WriteStats>& written) {
  std::lock_guard lock(mutex_);
  pending_.emplace_back(std::filesystem::absolute(path).lexically_normal().string(), written);
}

Future<WriteStats> AsyncCheckpointer::save_staged_by(const std::string& path,
                                                     const std::function<Future<Value>()>& stage,
                                                     std::string call_args) {
  wait_for_room(1);
  Future<WriteStats> written = process_->write(stage(), path, std::move(call_args));
  add_pending(path, written);
  return written;
}

std::pair<Future<void>, Future<WriteStats>> AsyncCheckpointer::save(const std::string& path,
                                                                    std::shared_ptr<const Value> state_dict,
                                                                    const StageCallOptions& call,
                                                                    std::string call_args) {
  if (!stager_) throw Error(ErrorCode::kFailedPrecondition, "AsyncCheckpointer::save: this checkpointer has no stager");
  wait_for_room(max_pending_);
  StageCallOptions leased = call;
  auto lease = std::make_shared<int>(0);
  leased.lease = lease;
  // Training may go on once the sources are released, which with copy-on-write staging comes
  // before the staged bytes are complete (Note [Copy-on-write staging]); the writer waits for those.
  // An asynchronous stager signals the release on its thread under its own locks, so `released` is
  // completed on notifier_'s thread (Note [Completing futures outside locks]). A stage that fails
  // before the release fails it with its error instead; one that fails after it only fails the
  // write. A synchronous stager releases and finishes inside stage(), on this thread, which holds
  // no lock once it returns: its staged future is ready on return (the callback stays, for the
  // copy-on-write accounting).
  std::shared_ptr<Promise<void>> released;
  Future<void> staged_done;
  if (stager_->options().use_async_staging) {
    released = std::make_shared<Promise<void>>();
    staged_done = released->get_future();
    leased.on_sources_released = [notifier = notifier_, released] {
      notifier->post([released] { released->set_value(); });
    };
  } else {
    leased.on_sources_released = [] {};
  }
  Future<Value> staged = stager_->stage(std::move(state_dict), leased);
  if (!released) {
    staged_done = staged.then([](const Value&) {});
  } else {
    staged.on_ready([notifier = notifier_, released, staged_done](const Future<Value>& f) {
      // Posted after the release when there was one (the stager releases before its future is
      // ready), and run in posting order: a released save is already ready here.
      notifier->post([released, staged_done, error = f.error()] {
        if (staged_done.ready()) return;
        if (error) {
          released->set_exception(error);
        } else {
          released->set_value();
        }
      });
    });
  }
  Future<WriteStats> written = process_->write(staged, path, std::move(call_args));
  // The lease ends with the write: its buffers may then be staged into again.
  written.on_ready([lease = std::move(lease)](const Future<WriteStats>&) mutable { lease.reset(); });
  add_pending(path, written);
  return {staged_done, written};
}

void AsyncCheckpointer::wait_for_path(const std::string& path) {
  const std::string target = std::filesystem::absolute(path).lexically_normal().string();
  std::vector<Future<WriteStats>> same;
  {
    std::lock_guard lock(mutex_);
    for (const auto& [p, f] : pending_) {
      if (p == target) same.push_back(f);
    }
  }
  for (auto& f : same) f.wait();
}

Value AsyncCheckpointer::load(const std::string& path) {
  wait_for_path(path);
  return reader_.read(path);
}

LoadResult AsyncCheckpointer::load_into(const std::string& path, Value& target, bool strict) {
  wait_for_path(path);
  return reader_.read_into(path, target, strict);
}

void AsyncCheckpointer::close() {
  if (stager_) stager_->close();  // stages what was queued: every release and staged future is posted by now
  notifier_->close();  // runs those
  process_->close();
  // Every write has ended: drop them, and with them what their errors hold (a Python exception
  // whose traceback may reach this checkpointer's owner).
  std::lock_guard lock(mutex_);
  pending_.clear();
}

// ---- builders -------------------------------------------------------------------------------------

std::unique_ptr<SyncCheckpointer> make_sync_checkpointer(const CheckpointerOptions& options) {
  return std::make_unique<SyncCheckpointer>(CheckpointWriter(options.rank, options.writer, options.barrier, options.hook),
                                            CheckpointReader(options.rank, options.reader));
}

std::unique_ptr<AsyncCheckpointer> make_async_checkpointer(const CheckpointerOptions& options) {
  StagingOptions staging;
  if (options.staging) {
    staging = *options.staging;
  } else {
    const bool cuda = CudaRuntime::instance()->available();
    staging.use_pinned_memory = cuda;
    staging.use_non_blocking_copy = cuda;
    staging.use_shared_memory = true;
    staging.use_async_staging = true;
  }
  auto stager = std::make_shared<DefaultStager>(staging);  // before the process: a failure here leaks nothing
  auto process = std::make_shared<CheckpointProcess>(options.rank, options.writer, options.process);
  return std::make_unique<AsyncCheckpointer>(std::move(stager), std::move(process),
                                             CheckpointReader(options.rank, options.reader), options.max_pending_saves);
}

}  // namespace fastdcp
