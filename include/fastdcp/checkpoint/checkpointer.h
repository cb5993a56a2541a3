#pragma once
// Checkpointers for C++ users, as torch.distributed.checkpoint._experimental's: a synchronous one
// that writes on the caller's thread, and an asynchronous one that stages in the background and
// writes in a separate writer process, fed the staged buffers themselves through shared memory.
//
// Note [Native writer process]
// CheckpointProcess starts the writer executable (fastdcp-writer, or any program that calls
// run_writer_process) with one end of a Unix socket pair. Each write sends the staged state dict
// as a share_state_dict message with the memfds of its buffers (SCM_RIGHTS; Note [Shared state
// dicts]); nothing of the tensor bytes is copied or serialized on the way. The writer answers
// each request with its outcome: a failed write fails only its own future and the writer goes on;
// a writer that dies or exceeds the write timeout fails the write in progress, is killed, and the
// next write starts a new one. Requests are served in the order they were made. A save the
// trainer could not hand over (its staging failed, no writer could start) is voted against by the
// writer process when one runs (a kAbandon request: it also joins that save's barrier), else by
// the trainer. Errors keep their ErrorCode, errno and message, and a CarriedError its blob.
// Barriers stay in the training process: the writer commits through the file-based votes of Note
// [Commit protocol], which need none. fastdcp.torch's writer is a Python child serving the same
// protocol (Note [Python writer process] in python/src/engine_bindings.cpp).

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/common/future.h"
#include "fastdcp/staging/stager.h"

namespace fastdcp {

struct CheckpointProcessOptions {
  std::chrono::milliseconds init_timeout = std::chrono::seconds(30);
  std::chrono::milliseconds shutdown_timeout = std::chrono::seconds(60);
  std::chrono::milliseconds write_timeout = std::chrono::hours(1);
  // The writer program: empty means $FASTDCP_WRITER, else the fastdcp-writer built with this
  // library, else fastdcp-writer on the PATH. A name without '/' is looked up on the PATH.
  std::string writer_executable;
  // Arguments after the program's name and before "--socket FD" (e.g. a Python interpreter's
  // ["-c", "..."]: fastdcp.torch's writer child, Note [Python writer process]).
  std::vector<std::string> writer_arguments;
  // Opaque bytes the kInit request carries to the writer's WriterProcessSetup::make_handler.
  std::string init_blob;
};

// An error the writer process reported: its code, errno and message, and opaque bytes (none from
// fastdcp-writer; from fastdcp.torch's child, the Python exception pickled: Note [Errors across
// the writer process]). A handler in the writer process throws one to carry such bytes.
class CarriedError : public Error {
 public:
  CarriedError(ErrorCode code, const std::string& message, int errnum, std::string blob)
      : Error(code, message, errnum), blob_(std::move(blob)) {}
  const std::string& blob() const noexcept { return blob_; }

 private:
  std::string blob_;
};

// What serves the requests in a writer process. `call_args` are the opaque bytes the trainer gave
// that write (CheckpointProcess::write); errors reach the trainer's future with their ErrorCode,
// errno and message, and a CarriedError's blob.
// One write request as the writer process receives it: the shared state dict's message and the
// memfds it names (Note [Shared state dicts]). The handler attaches them as it needs: attach_plan
// for fastdcp's writer, which writes the trainer's plan without building a tree; attach_state_dict
// for a writer that takes a tree. Both take the memfds over (take_fds); any not taken are closed
// with the request.
class SharedWrite {
 public:
  SharedWrite(std::string_view message, std::vector<int> fds) : message_(message), fds_(std::move(fds)) {}
  ~SharedWrite();
  SharedWrite(const SharedWrite&) = delete;
  SharedWrite& operator=(const SharedWrite&) = delete;

  std::string_view message() const { return message_; }
  std::vector<int> take_fds() { return std::exchange(fds_, {}); }

 private:
  std::string_view message_;
  std::vector<int> fds_;
};

class WriterProcessHandler {
 public:
  virtual ~WriterProcessHandler() = default;
  virtual WriteStats write(const std::string& path, SharedWrite& shared, const std::string& call_args) = 0;
  // The trainer could not hand this save over: vote against it and join its barrier, as a failed
  // write would (CheckpointWriter::abandon), so that no rank waits for this one.
  virtual void abandon(const std::string& path, const std::string& error, const std::string& call_args) = 0;
  virtual void close() {}
};

// What the kInit request tells the writer process.
struct WriterProcessInit {
  RankInfo rank;
  WriterOptions writer;
  std::string blob;  // CheckpointProcessOptions::init_blob
};

// What a custom writer program (CheckpointProcessOptions::writer_executable) sets up in the writer
// process, as upstream's subprocess_init_fn and checkpoint_writer_init_fn do.
struct WriterProcessSetup {
  std::function<void()> init;           // runs first; an error fails the writer's start
  std::shared_ptr<WriterHook> hook;     // pre_commit / post_commit, in the writer process
  std::shared_ptr<Barrier> barrier;     // between them; none is needed for the commit itself
  // When set, makes what serves the writes (after init); otherwise a CheckpointWriter with the
  // hook and barrier above does. An error fails the writer's start.
  std::function<std::unique_ptr<WriterProcessHandler>(const WriterProcessInit&)> make_handler;
};

// The program CheckpointProcess starts: serves requests on `socket_fd` until told to stop or the
// trainer goes away; returns the process's exit status. fastdcp-writer is main() around it.
int run_writer_process(int socket_fd, const WriterProcessSetup& setup = {});

class CheckpointProcess {
 public:
  // Starts the writer in the background; a failure to start is reported by the first write.
  CheckpointProcess(RankInfo rank, WriterOptions writer, CheckpointProcessOptions options = {});
  ~CheckpointProcess();  // close()
  CheckpointProcess(const CheckpointProcess&) = delete;
  CheckpointProcess& operator=(const CheckpointProcess&) = delete;

  // Writes what `staged` yields (CPU tensors; storages outside fastdcp's shared memory are copied
  // once into it) to `path`, after every earlier write. `call_args` go to the writer process's
  // handler with it. If the tree never reaches the writer (staging failed, no writer could be
  // started), the save is voted against: by the writer process when one runs (its barrier is
  // joined), else from here. Error(kFailedPrecondition) after close().
  Future<WriteStats> write(Future<Value> staged, std::string path, std::string call_args = {});
  // Ready once the first writer process has started (with its start-up error, if any).
  Future<void> started() const { return started_future_; }
  // Finishes the write in progress, cancels queued ones, and ends the writer within the shutdown
  // timeout (killing it past that). Idempotent.
  void close();

  pid_t pid() const;       // the current writer's process id, 0 when none runs
  int restarts() const;    // writers started again after one died or hung

  struct Worker;

 private:
  struct Job {
    Future<Value> staged;
    std::string path;
    std::string call_args;
    Promise<WriteStats> promise;
  };
  void comms_loop();
  WriteStats run_write(Job& job);
  void vote_against(const Job& job, const std::string& error);
  void ensure_worker();
  void drop_worker();

  RankInfo rank_;
  WriterOptions writer_;
  CheckpointProcessOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable queue_cv_;
  std::deque<Job> queue_;
  bool closing_ = false;
  // The comms thread alone starts, uses and drops workers (close() once it has ended).
  bool started_ = false;
  std::atomic<int> restarts_{0};
  std::atomic<pid_t> pid_{0};
  std::unique_ptr<Worker> worker_;
  Future<void> started_future_;
  std::thread comms_;
};

class Checkpointer {
 public:
  virtual ~Checkpointer() = default;
  // Loads `path` whole.
  virtual Value load(const std::string& path) = 0;
  // Fills `target` in place (see CheckpointReader::read_into).
  virtual LoadResult load_into(const std::string& path, Value& target, bool strict = false) = 0;
  virtual void close() = 0;
};

class SyncCheckpointer final : public Checkpointer {
 public:
  SyncCheckpointer(CheckpointWriter writer, CheckpointReader reader);
  WriteStats save(const std::string& path, const Value& state_dict);
  Value load(const std::string& path) override;
  LoadResult load_into(const std::string& path, Value& target, bool strict = false) override;
  void close() override {}

 private:
  CheckpointWriter writer_;
  CheckpointReader reader_;
};

// Note [Saves in flight] (as in fastdcp.torch): each save's staged buffers are leased until its
// write is done, so up to max_pending_saves saves may be staging or writing at once without one
// overwriting another's buffers; a further save first waits for the oldest.
class AsyncCheckpointer final : public Checkpointer {
 public:
  // `stager` may be null when every save is save_staged_by().
  AsyncCheckpointer(std::shared_ptr<DefaultStager> stager, std::shared_ptr<CheckpointProcess> process,
                    CheckpointReader reader, int max_pending_saves = 2);
  ~AsyncCheckpointer() override;

  // (staged, written): the first is ready when training may change its tensors, the second when
  // the checkpoint is committed, or with this save's own error. Their callbacks run on threads
  // holding none of the checkpointer's or stager's locks (Note [Completing futures outside locks]).
  // `call_args` go to the writer process with the write (CheckpointProcess::write).
  std::pair<Future<void>, Future<WriteStats>> save(const std::string& path, std::shared_ptr<const Value> state_dict,
                                                     const StageCallOptions& call = {}, std::string call_args = {});
  // A save staged by a stager that cannot lease (one outside fastdcp, which reuses its buffers on
  // every call): waits, as upstream, for every earlier write, then calls `stage` and writes what
  // it yields. The checkpointer needs no stager of its own for it.
  Future<WriteStats> save_staged_by(const std::string& path, const std::function<Future<Value>()>& stage,
                                    std::string call_args = {});
  // Both wait for pending saves to the same path first.
  Value load(const std::string& path) override;
  LoadResult load_into(const std::string& path, Value& target, bool strict = false) override;
  void close() override;
  // Waits for the pending saves to `path` (as load() does), whatever their outcome.
  void wait_for_path(const std::string& path);

 private:
  void wait_for_room(int room_for);
  void add_pending(const std::string& path, const Future<WriteStats>& written);

  std::shared_ptr<DefaultStager> stager_;
  std::shared_ptr<CheckpointProcess> process_;
  CheckpointReader reader_;
  int max_pending_;
  std::mutex mutex_;
  std::deque<std::pair<std::string, Future<WriteStats>>> pending_;  // (absolute path, write), oldest first
  // Completes the staged futures, which the stager signals under its locks.
  std::shared_ptr<SerialExecutor> notifier_ = std::make_shared<SerialExecutor>("checkpointer staged notifier");
};

struct CheckpointerOptions {
  RankInfo rank;
  WriterOptions writer;
  ReadOptions reader;
  std::shared_ptr<Barrier> barrier;  // sync checkpointer only: see Note [Native writer process]
  std::shared_ptr<WriterHook> hook;  // sync checkpointer only
  // Staging: fastdcp's own API picks what the host allows (shared memory for the writer process;
  // pinned memory and non-blocking copies only where CUDA is available), unlike upstream's
  // defaults, which fail on a host without an accelerator.
  std::optional<StagingOptions> staging;
  CheckpointProcessOptions process;
  int max_pending_saves = 2;
};

// Upstream's names for the same things (docs/design.md maps every upstream name).
using CheckpointerConfig = CheckpointerOptions;
using CheckpointProcessConfig = CheckpointProcessOptions;

std::unique_ptr<SyncCheckpointer> make_sync_checkpointer(const CheckpointerOptions& options = {});
std::unique_ptr<AsyncCheckpointer> make_async_checkpointer(const CheckpointerOptions& options = {});

}  // namespace fastdcp
