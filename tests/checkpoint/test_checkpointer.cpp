#include "fastdcp/checkpoint/checkpointer.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <thread>

#include "fastdcp/common/error.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

using namespace std::chrono_literals;

Tensor filled(DType dtype, Dims shape, float value) {
  Tensor t = Tensor::empty_cpu(dtype, std::move(shape));
  auto* p = static_cast<float*>(t.data_ptr());
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = value + static_cast<float>(i % 97);
  return t;
}

// As filled(), in an anonymous mapping of its own: no other memory (malloc's bookkeeping, another
// thread's data) shares its pages, so nothing but the test writes them.
Tensor filled_in_own_pages(Dims shape, float value) {
  const Tensor like = filled(DType::kF32, shape, value);
  void* data = mmap(nullptr, like.nbytes(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (data == MAP_FAILED) throw std::runtime_error("mmap failed");
  std::memcpy(data, like.data_ptr(), like.nbytes());
  const size_t nbytes = like.nbytes();
  std::shared_ptr<const void> unmap(data, [nbytes](const void* p) { munmap(const_cast<void*>(p), nbytes); });
  return Tensor(Storage::wrap(data, nbytes, Device::cpu(), std::move(unmap)), DType::kF32, like.shape(),
                like.strides(), 0);
}

std::shared_ptr<Value> model_state(float value, int64_t step) {
  auto sd = std::make_shared<Value>(Value::dict());
  Tensor weight = filled(DType::kF32, {512, 256}, value);
  Value model = Value::dict();
  model.insert("weight", weight);
  model.insert("weight_t", weight.view_as({256, 512}, {1, 256}, 0));
  model.insert("bias", filled(DType::kF32, {300}, value * 2));
  sd->insert("model", std::move(model));
  sd->insert("step", Value(step));
  return sd;
}

void expect_state(const Value& loaded, float value, int64_t step) {
  EXPECT_EQ(loaded.at("step").as_int(), step);
  const Tensor want = filled(DType::kF32, {512, 256}, value);
  const Tensor& weight = loaded.at("model").at("weight").as_tensor();
  EXPECT_EQ(std::memcmp(weight.data_ptr(), want.data_ptr(), want.nbytes()), 0) << "step " << step;
  EXPECT_EQ(loaded.at("model").at("weight_t").as_tensor().storage(), weight.storage());
}

CheckpointerOptions cpu_options(const std::string& writer = {}) {
  CheckpointerOptions options;
  options.process.writer_executable = writer;
  return options;
}

class CheckpointerTest : public ::testing::Test {
 protected:
  std::string at(const std::string& name) const { return dir_.path() + "/" + name; }
  testing::TempDir dir_{"fastdcp_checkpointer"};
};

TEST_F(CheckpointerTest, AsyncSaveStagesThenWritesInTheWriterProcess) {
  auto checkpointer = make_async_checkpointer(cpu_options());
  auto [staged, written] = checkpointer->save(at("a"), model_state(1, 1));
  staged.get();
  const WriteStats stats = written.get();
  EXPECT_GT(stats.bytes_written, 512u * 256 * 4);
  expect_state(checkpointer->load(at("a")), 1, 1);
  checkpointer->close();
}

TEST_F(CheckpointerTest, DefaultsChooseWhatAHostWithoutAcceleratorAllows) {
  if (CudaRuntime::instance()->available()) GTEST_SKIP() << "checks the CPU-only choice";
  // Upstream's defaults (non-blocking copies) fail here; fastdcp's own builder picks what works.
  EXPECT_NO_THROW(make_async_checkpointer()->close());
}

TEST_F(CheckpointerTest, OverlappingSavesKeepTheirOwnContents) {
  CheckpointerOptions options = cpu_options(FASTDCP_SLOW_WRITER);
  options.max_pending_saves = 3;
  ::setenv("SLOW_WRITER_MS", "300", 1);
  auto checkpointer = make_async_checkpointer(options);
  auto source = model_state(0, 0);
  std::vector<Future<WriteStats>> writes;
  for (int i = 0; i < 5; ++i) {
    // Change the source in place, as training does, once each staging is done.
    auto next = model_state(static_cast<float>(i), i);
    std::memcpy(source->at("model").at("weight").as_tensor().data_ptr(),
                next->at("model").at("weight").as_tensor().data_ptr(), 512 * 256 * 4);
    *source->find("step") = Value(int64_t{i});
    auto [staged, written] = checkpointer->save(at("slow_" + std::to_string(i)), source);
    staged.get();
    writes.push_back(written);
  }
  for (auto& w : writes) w.get();
  for (int i = 0; i < 5; ++i) expect_state(checkpointer->load(at("slow_" + std::to_string(i))), i, i);
  checkpointer->close();
}

TEST_F(CheckpointerTest, StagedCallbacksMayCallBackIntoTheStagerAndTheCheckpointer) {
  // The stager signals the release under its own lock; a callback on the staged future run there
  // would deadlock on stats() (Note [Completing futures outside locks]). 64 MiB take long enough
  // to stage that the callback is registered before the release.
  auto stager = std::make_shared<DefaultStager>(testing::cpu_staging(/*async=*/true, /*shared=*/true));
  auto process = std::make_shared<CheckpointProcess>(RankInfo{}, WriterOptions{}, cpu_options().process);
  AsyncCheckpointer checkpointer(stager, process, CheckpointReader());
  auto sd = std::make_shared<Value>(Value::dict());
  sd->insert("weight", filled(DType::kF32, {4096, 4096}, 1));
  auto [staged, written] = checkpointer.save(at("outer"), sd);
  auto nested = std::make_shared<Promise<WriteStats>>();
  Future<WriteStats> nested_written = nested->get_future();
  staged.on_ready([&, nested](const Future<void>& f) {
    f.get();
    EXPECT_GE(stager->stats().stage_calls, 0u);
    // Another save from inside the callback, its write handed on.
    checkpointer.save(at("inner"), model_state(2, 2)).second.on_ready([nested](const Future<WriteStats>& w) {
      try {
        nested->set_value(w.get());
      } catch (...) {
        nested->set_exception(std::current_exception());
      }
    });
  });
  ASSERT_TRUE(nested_written.wait_for(60s)) << "a staged callback deadlocked";
  nested_written.get();
  written.get();
  expect_state(checkpointer.load(at("inner")), 2, 2);
  checkpointer.close();
}

TEST_F(CheckpointerTest, WithASynchronousStagerTheStagedFutureIsReadyOnReturn) {
  auto stager = std::make_shared<DefaultStager>(testing::cpu_staging(/*async=*/false, /*shared=*/true));
  auto process = std::make_shared<CheckpointProcess>(RankInfo{}, WriterOptions{}, cpu_options().process);
  AsyncCheckpointer checkpointer(stager, process, CheckpointReader());
  auto [staged, written] = checkpointer.save(at("sync"), model_state(1, 1));
  EXPECT_TRUE(staged.ready());
  written.get();
  checkpointer.close();
}

TEST_F(CheckpointerTest, TrainingMayWriteOnceStagedEvenBeforeTheCopyIsDone) {
  // Copy-on-write staging releases the sources before they are copied (Note [Copy-on-write
  // staging]); what training writes then must not reach the checkpoint.
  auto stager = std::make_shared<DefaultStager>(testing::cpu_staging(/*async=*/true, /*shared=*/true));
  if (std::string why; !stager->copy_on_write_available(&why)) GTEST_SKIP() << why;
  auto process = std::make_shared<CheckpointProcess>(RankInfo{}, WriterOptions{}, cpu_options().process);
  AsyncCheckpointer checkpointer(stager, process, CheckpointReader());
  auto sd = std::make_shared<Value>(Value::dict());
  std::vector<Tensor> weights;
  for (int i = 0; i < 4; ++i) {
    weights.push_back(filled_in_own_pages({512, 1024}, 3 + i));  // 2 MiB each
    sd->insert("weight" + std::to_string(i), weights.back());
  }
  auto [staged, written] = checkpointer.save(at("cow"), sd);
  staged.get();
  for (Tensor& weight : weights) std::memset(weight.data_ptr(), 0, weight.nbytes());
  written.get();
  const Value loaded = checkpointer.load(at("cow"));
  for (int i = 0; i < 4; ++i) {
    const Tensor want = filled(DType::kF32, {512, 1024}, 3 + i);
    EXPECT_EQ(std::memcmp(loaded.at("weight" + std::to_string(i)).as_tensor().data_ptr(), want.data_ptr(),
                          want.nbytes()),
              0);
  }
  // Nothing wrote the sources before the release (their pages are their own): every byte was
  // copied after it (Note [Counting copies after release]).
  EXPECT_EQ(stager->stats().bytes_copied_after_release, 4 * weights[0].nbytes());
  checkpointer.close();
}

TEST_F(CheckpointerTest, AFailedWriteFailsOnlyItsOwnFuture) {
  auto checkpointer = make_async_checkpointer(cpu_options());
  std::ofstream(at("not_a_dir")) << "a file where the checkpoint directory should be";
  auto failed = checkpointer->save(at("not_a_dir"), model_state(1, 1)).second;
  try {
    failed.get();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not_a_dir"), std::string::npos) << e.what();
  }
  auto written = checkpointer->save(at("ok"), model_state(2, 2)).second;
  written.get();
  expect_state(checkpointer->load(at("ok")), 2, 2);
  checkpointer->close();
}

TEST_F(CheckpointerTest, LoadWaitsForAPendingSaveToTheSamePath) {
  ::setenv("SLOW_WRITER_MS", "800", 1);
  auto checkpointer = make_async_checkpointer(cpu_options(FASTDCP_SLOW_WRITER));
  auto written = checkpointer->save(at("slow"), model_state(3, 3)).second;
  expect_state(checkpointer->load(at("slow")), 3, 3);  // no committed checkpoint yet without the wait
  EXPECT_TRUE(written.ready());
  checkpointer->close();
}

TEST_F(CheckpointerTest, AKilledWriterFailsItsWriteAndTheNextSaveStartsANewOne) {
  ::setenv("SLOW_WRITER_MS", "5000", 1);
  CheckpointerOptions options = cpu_options(FASTDCP_SLOW_WRITER);
  auto stager = std::make_shared<DefaultStager>(testing::cpu_staging(/*async=*/true, /*shared=*/true));
  auto process = std::make_shared<CheckpointProcess>(RankInfo{}, WriterOptions{}, options.process);
  AsyncCheckpointer checkpointer(stager, process, CheckpointReader());
  checkpointer.save(at("good"), model_state(4, 4)).second.get();
  auto doomed = checkpointer.save(at("slow_doomed"), model_state(5, 5)).second;
  std::this_thread::sleep_for(500ms);  // inside pre_commit now
  ASSERT_GT(process->pid(), 0);
  ::kill(process->pid(), SIGKILL);
  try {
    doomed.get();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("SIGKILL"), std::string::npos) << e.what();
  }
  EXPECT_THROW(checkpointer.load(at("slow_doomed")), Error);  // nothing committed
  checkpointer.save(at("after"), model_state(6, 6)).second.get();
  EXPECT_EQ(process->restarts(), 1);
  expect_state(checkpointer.load(at("after")), 6, 6);
  expect_state(checkpointer.load(at("good")), 4, 4);
  checkpointer.close();
}

TEST_F(CheckpointerTest, AHungWriteTimesOutAndItsWriterIsReplaced) {
  ::setenv("SLOW_WRITER_MS", "60000", 1);
  CheckpointerOptions options = cpu_options(FASTDCP_SLOW_WRITER);
  options.process.write_timeout = 5s;  // also bounds the next, real write: room for a loaded machine
  auto checkpointer = make_async_checkpointer(options);
  auto hung = checkpointer->save(at("slow_hung"), model_state(7, 7)).second;
  const auto start = std::chrono::steady_clock::now();
  try {
    hung.get();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("did not finish writing"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 30s);
  checkpointer->save(at("next"), model_state(8, 8)).second.get();
  expect_state(checkpointer->load(at("next")), 8, 8);
  checkpointer->close();
}

TEST_F(CheckpointerTest, AWriterThatCannotStartIsAClearErrorOnTheWrite) {
  auto missing = make_async_checkpointer(cpu_options(dir_.path() + "/no-such-writer"));
  try {
    missing->save(at("x"), model_state(1, 1)).second.get();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("writer_executable"), std::string::npos) << e.what();
  }
  missing->close();

  ::setenv("SLOW_WRITER_INIT_MS", "30000", 1);
  CheckpointerOptions options = cpu_options(FASTDCP_SLOW_WRITER);
  options.process.init_timeout = 500ms;
  auto late = make_async_checkpointer(options);
  try {
    late->save(at("y"), model_state(1, 1)).second.get();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("initializing"), std::string::npos) << e.what();
  }
  ::unsetenv("SLOW_WRITER_INIT_MS");
  late->close();
}

TEST_F(CheckpointerTest, CloseEndsTheWriterProcess) {
  auto stager = std::make_shared<DefaultStager>(testing::cpu_staging(/*async=*/true, /*shared=*/true));
  auto process = std::make_shared<CheckpointProcess>(RankInfo{}, WriterOptions{});
  AsyncCheckpointer checkpointer(stager, process, CheckpointReader());
  checkpointer.save(at("c"), model_state(1, 1)).second.get();
  const pid_t pid = process->pid();
  ASSERT_GT(pid, 0);
  EXPECT_EQ(::kill(pid, 0), 0);
  checkpointer.close();
  checkpointer.close();
  EXPECT_EQ(process->pid(), 0);
  EXPECT_NE(::kill(pid, 0), 0);  // gone and reaped
  EXPECT_THROW(process->write(make_ready_future(Value()), at("late")), Error);
}

// ---- the frame protocol, through a writer program with its own handler ----------------------------

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

Future<Value> ready_state(float value, int64_t step) { return make_ready_future(std::move(*model_state(value, step))); }

CheckpointProcessOptions handler_writer(const std::string& tag, std::string init_blob = "INIT") {
  CheckpointProcessOptions options;
  options.writer_executable = FASTDCP_HANDLER_WRITER;
  options.writer_arguments = {"--tag", tag};
  options.init_blob = std::move(init_blob);
  return options;
}

TEST_F(CheckpointerTest, ArgumentsInitBlobAndCallArgsReachTheWritersHandler) {
  CheckpointProcess process(RankInfo{}, WriterOptions{}, handler_writer("T1", std::string("in\0it", 5)));
  const WriteStats stats = process.write(ready_state(1, 1), at("k"), "kw=1").get();
  EXPECT_EQ(stats.file, at("k") + ".args");
  EXPECT_EQ(read_file(at("k.args")), std::string("T1|in\0it|kw=1", 13));
  process.close();
}

TEST_F(CheckpointerTest, AWritersErrnoAndCarriedBlobCrossTheProcess) {
  CheckpointProcess process(RankInfo{}, WriterOptions{}, handler_writer("T2"));
  // The futures outlive the handlers: an exception's last owner is then this thread, as TSan,
  // which does not see libstdc++'s exception counts, needs.
  Future<WriteStats> full = process.write(ready_state(1, 1), at("full"), "enospc");
  Future<WriteStats> carried = process.write(ready_state(1, 1), at("carried"), "carry");
  try {
    full.get();
    ADD_FAILURE() << "no error";
  } catch (const CarriedError& e) {
    EXPECT_EQ(e.code(), ErrorCode::kIoError);
    EXPECT_EQ(e.errnum(), ENOSPC);
    EXPECT_EQ(std::string(e.what()), "no room for " + at("full"));
    EXPECT_EQ(e.blob(), "");
  }
  try {
    carried.get();
    ADD_FAILURE() << "no error";
  } catch (const CarriedError& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_EQ(std::string(e.what()), "carried");
    EXPECT_EQ(e.blob(), "BLOB");
  }
  EXPECT_EQ(process.restarts(), 0);  // the writer went on serving
  process.write(ready_state(1, 1), at("after"), "ok").get();
  process.close();  // the writer's thread is done with every future
}

TEST_F(CheckpointerTest, ASaveThatNeverReachesTheWriterIsAbandonedByTheWriterProcess) {
  CheckpointProcess process(RankInfo{}, WriterOptions{}, handler_writer("T3"));
  Promise<Value> staging;
  staging.set_exception(std::make_exception_ptr(Error(ErrorCode::kResourceExhausted, "staging ran out")));
  EXPECT_THROW(process.write(staging.get_future(), at("lost"), "kw=3").get(), Error);
  EXPECT_EQ(read_file(at("lost.abandoned")), "staging ran out|kw=3");
  process.close();
}

TEST_F(CheckpointerTest, TimeoutsAreDeadlineExceededNamingTheOption) {
  ::setenv("SLOW_WRITER_INIT_MS", "30000", 1);
  CheckpointProcessOptions options;
  options.writer_executable = FASTDCP_SLOW_WRITER;
  options.init_timeout = 300ms;
  CheckpointProcess process(RankInfo{}, WriterOptions{}, options);
  try {
    process.started().get();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDeadlineExceeded);
    EXPECT_NE(std::string(e.what()).find("Timed out after 0.3s"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("init_timeout"), std::string::npos) << e.what();
  }
  ::unsetenv("SLOW_WRITER_INIT_MS");
  process.close();
}

TEST_F(CheckpointerTest, ASaveStagedElsewhereWaitsForTheWriteBeforeIt) {
  ::setenv("SLOW_WRITER_MS", "500", 1);
  auto process = std::make_shared<CheckpointProcess>(RankInfo{}, WriterOptions{}, cpu_options(FASTDCP_SLOW_WRITER).process);
  AsyncCheckpointer checkpointer(nullptr, process, CheckpointReader());
  auto first = checkpointer.save_staged_by(at("slow1"), [&] { return ready_state(1, 1); });
  bool first_done_when_staging = false;
  auto second = checkpointer.save_staged_by(at("k2"), [&] {
    first_done_when_staging = first.ready();
    return ready_state(2, 2);
  });
  second.get();
  EXPECT_TRUE(first_done_when_staging);  // such a stager reuses its buffers: as upstream
  EXPECT_THROW(checkpointer.save(at("k3"), model_state(3, 3)), Error);  // no stager of its own
  expect_state(checkpointer.load(at("slow1")), 1, 1);
  checkpointer.close();
}

}  // namespace
}  // namespace fastdcp
