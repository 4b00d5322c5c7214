package worker_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
)

// syllabusText is a shared system prompt of some 6,000 tokens.
var syllabusText = strings.Repeat("The course covers fractions, decimals, ratios and percentages in depth. ", 360)

// cachedJob is a job whose system prompt is the syllabus, marked for
// caching, and whose question is its own.
func cachedJob(user, question string) map[string]any {
	return map[string]any{
		"user_id": user,
		"request": map[string]any{
			"model": harness.Model, "max_tokens": 50,
			"system":   []map[string]any{{"type": "text", "text": syllabusText, "cache_control": map[string]string{"type": "ephemeral"}}},
			"messages": []map[string]any{{"role": "user", "content": question}},
		},
	}
}

// slowStart is the fake's wait before each answer begins: calls sent
// together would each write the prefix (it becomes readable only when the
// first answer begins).
var slowStart = fakeanthropic.Config{Latency: 300 * time.Millisecond}

// Twenty queued jobs share a prefix nobody has cached: one call writes it
// and the other nineteen read it — not one creation each.
func TestQueuedJobsSharingAPrefixWriteItOnce(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, Fake: slowStart})
	var ids []string
	for i := range 20 {
		ids = append(ids, e.Submit(t, cachedJob(fmt.Sprintf("student-%02d", i), fmt.Sprintf("question %d [[reply_tokens=5]]", i))).ID)
	}
	e.Worker = harness.StartWorker(t, e)
	for id, v := range waitAll(t, e, ids, within) {
		if v.Status != jobs.Succeeded {
			t.Fatalf("job %s: %s", id, v.Status)
		}
	}
	writes, reads := cacheCalls(e.Fake.Stats())
	if writes != 1 || reads != 19 {
		t.Fatalf("%d calls wrote the prefix and %d read it; want 1 and 19", writes, reads)
	}

	// The read ratio, on the status and the metrics.
	resp, b := e.Do(t, http.MethodGet, "/v1/admin/status", harness.AdminKey, nil)
	var st struct {
		Groups []struct {
			Cache struct {
				ReadRatio *float64 `json:"read_ratio"`
				Held      int64    `json:"held"`
			} `json:"cache"`
		} `json:"groups"`
	}
	if resp.StatusCode != http.StatusOK || json.Unmarshal(b, &st) != nil || len(st.Groups) != 1 {
		t.Fatalf("status: %d %s", resp.StatusCode, b)
	}
	if c := st.Groups[0].Cache; c.ReadRatio == nil || *c.ReadRatio < 0.9 || c.Held != 0 {
		t.Fatalf("status cache: %s", b)
	}
	_, page := e.Do(t, http.MethodGet, "/metrics", "", nil)
	if v, ok := harness.Metric(string(page), `sluice_cache_read_ratio{group="sonnet"}`); !ok || v < 0.9 {
		t.Fatalf("sluice_cache_read_ratio = %v (%v), want >= 0.9", v, ok)
	}
}

// When the writer's answer does not begin within cache_hold, the jobs held
// for it go anyway (each writing the prefix itself): a slow or failing
// first call never holds the others longer than the hold.
func TestCacheHoldNeverOutlastsItsTime(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, GroupExtra: "    cache_hold: 300ms\n"})
	slow := e.Submit(t, cachedJob("student-00", "question 0 [[reply_tokens=5]] [[latency_ms=60000]]")).ID
	var ids []string
	for i := 1; i < 6; i++ {
		ids = append(ids, e.Submit(t, cachedJob(fmt.Sprintf("student-%02d", i), fmt.Sprintf("question %d [[reply_tokens=5]]", i))).ID)
	}
	e.Worker = harness.StartWorker(t, e)
	for id, v := range waitAll(t, e, ids, within) {
		if v.Status != jobs.Succeeded {
			t.Fatalf("job %s: %s", id, v.Status)
		}
	}
	if v := e.Get(t, slow); v.Status.Terminal() {
		t.Fatalf("the slow writer ended (%s) before the jobs held for it: the test proves nothing", v.Status)
	}
}

// A writer whose call fails before its answer begins (a 529) releases the
// jobs held for it at once; the prefix is still written once.
func TestCacheWriterFailingReleasesTheHold(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, Fake: slowStart, GroupExtra: "    cache_hold: 60s\n"})
	e.Fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultOverloaded})
	var ids []string
	for i := range 6 {
		ids = append(ids, e.Submit(t, cachedJob(fmt.Sprintf("student-%02d", i), fmt.Sprintf("question %d [[reply_tokens=5]]", i))).ID)
	}
	e.Worker = harness.StartWorker(t, e)
	for id, v := range waitAll(t, e, ids, within) {
		if v.Status != jobs.Succeeded {
			t.Fatalf("job %s: %s", id, v.Status)
		}
	}
	if writes, reads := cacheCalls(e.Fake.Stats()); writes != 1 || reads != 5 {
		t.Fatalf("%d calls wrote the prefix and %d read it; want 1 and 5", writes, reads)
	}
}

// cacheCalls counts the answered calls that wrote and that read the cache.
func cacheCalls(st fakeanthropic.Stats) (writes, reads int) {
	for _, r := range st.Log {
		if r.Status != 200 {
			continue
		}
		if r.CacheCreationInputTokens > 0 {
			writes++
		}
		if r.CacheReadInputTokens > 0 {
			reads++
		}
	}
	return writes, reads
}
