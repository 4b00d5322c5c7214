package scheduler

import (
	"context"
	_ "embed"
	"encoding/json"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
)

// The Message Batches side of a model group (model_groups[].batch): jobs
// admitted for a batch wait in the group's batch line; a worker takes them
// under a claim, creates the batch upstream and records it; any worker
// polls the group's batches and finishes each job from its result. Every
// step is one call of lua/batch.lua (see its header); the jobs' own
// transitions (start, end) are lifecycle steps like any call's.

var (
	//go:embed lua/batch.lua
	batchSrc    string
	batchScript = redis.NewScript(prelude + batchSrc)
)

// BatchJob is a job taken for a batch, and the dispatch that took it.
type BatchJob struct {
	ID       string
	Dispatch int
}

// BatchEntry is a batch the group holds jobs in.
type BatchEntry struct {
	ID   string
	Jobs []BatchJob
	// Adopted: it was found upstream for claims whose workers died before
	// recording their batches (Claims; which of their jobs it holds shows
	// in its results).
	Adopted bool
	Claims  []string
	// Cancel: the upstream was asked to cancel it.
	Cancel bool
}

// BatchClaim is a claim on jobs taken for a batch that was never recorded.
type BatchClaim struct {
	ID      string
	At      time.Time
	Jobs    []BatchJob
	Adopted []string // batches found upstream for it
}

type batchEntryJSON struct {
	Jobs    json.RawMessage `json:"jobs"` // a list ({} when empty: Lua's cjson)
	Claim   string          `json:"claim"`
	Claims  []string        `json:"claims"`
	Adopted int             `json:"adopted"`
	Cancel  int             `json:"cancel"`
	At      float64         `json:"at"`
	Adopts  []string        `json:"adopted_ids"`
}

func batchJobs(raw json.RawMessage) []BatchJob {
	var list [][2]json.RawMessage
	_ = json.Unmarshal(raw, &list) // {}: none
	out := make([]BatchJob, 0, len(list))
	for _, jd := range list {
		var id string
		var d float64
		if json.Unmarshal(jd[0], &id) == nil && json.Unmarshal(jd[1], &d) == nil {
			out = append(out, BatchJob{ID: id, Dispatch: int(d)})
		}
	}
	return out
}

// batch runs one op of lua/batch.lua for group g.
func (s *Scheduler) batch(ctx context.Context, g string, op string, args ...any) ([]any, error) {
	k := keys{g}
	res, err := batchScript.Run(ctx, s.rdb, []string{
		k.batchLine(), k.delayed(), k.delayedTags(), k.deadlines(), jobs.WaitingUsersKey(g), k.live(),
		k.batchClaims(), k.batches(), k.batched(),
	}, append([]any{s.now(), op, rkeys.Prefix, rkeys.UserPrefix(g)}, args...)...).Slice()
	if err != nil {
		return nil, fmt.Errorf("scheduler: batch %s %s: %w", op, g, err)
	}
	return res, nil
}

// TakeBatch takes the group's jobs waiting for a batch under claim, once
// the first has waited window or maxJobs wait. With none to take it
// returns the wait until some may be (0: none wait at all).
func (s *Scheduler) TakeBatch(ctx context.Context, g string, window time.Duration, maxJobs int, claim string) ([]BatchJob, time.Duration, error) {
	res, err := s.batch(ctx, g, "take", window.Milliseconds(), maxJobs, claim)
	if err != nil || len(res) == 0 {
		return nil, 0, err
	}
	switch fmt.Sprint(res[0]) {
	case "wait":
		return nil, time.Duration(toInt(res[1])) * time.Millisecond, nil
	case "take":
		var out []BatchJob
		for i := 1; i+1 < len(res); i += 2 {
			out = append(out, BatchJob{ID: fmt.Sprint(res[i]), Dispatch: toInt(res[i+1])})
		}
		return out, 0, nil
	}
	return nil, 0, nil
}

// RecordBatch records that the upstream created batch id from claim's
// jobs; its first check is due after poll. It returns false when the
// claim is gone (its jobs were put back in line meanwhile).
func (s *Scheduler) RecordBatch(ctx context.Context, g, claim, id string, poll time.Duration) (bool, error) {
	res, err := s.batch(ctx, g, "record", claim, id, poll.Milliseconds())
	if err != nil || len(res) == 0 {
		return false, err
	}
	return fmt.Sprint(res[0]) == "ok", nil
}

// AdoptBatch records batch id, found upstream, as possibly holding the
// jobs of claim (whose worker died before recording its batch); false
// when id is a recorded batch (another claim's).
func (s *Scheduler) AdoptBatch(ctx context.Context, g, claim, id string, poll time.Duration) (bool, error) {
	res, err := s.batch(ctx, g, "adopt", claim, id, poll.Milliseconds())
	if err != nil || len(res) == 0 {
		return false, err
	}
	return fmt.Sprint(res[0]) == "ok", nil
}

// ReturnBatch puts claim's jobs that are in no batch back in the batch
// line, where they wait for the next batch (or their fallback time), and
// drops the claim. It returns how many went back.
func (s *Scheduler) ReturnBatch(ctx context.Context, g, claim string) (int, error) {
	res, err := s.batch(ctx, g, "return", claim)
	if err != nil || len(res) == 0 {
		return 0, err
	}
	return toInt(res[0]), nil
}

// BatchesDue returns the group's batches whose next check is due (pushing
// it back, the wait doubled up to pollMax) and the claims not recorded
// within check of being made or of their last look.
func (s *Scheduler) BatchesDue(ctx context.Context, g string, check, pollMax time.Duration) ([]BatchEntry, []BatchClaim, error) {
	res, err := s.batch(ctx, g, "due", check.Milliseconds(), pollMax.Milliseconds())
	if err != nil {
		return nil, nil, err
	}
	var bs []BatchEntry
	var cs []BatchClaim
	for i := 0; i+2 < len(res); i += 3 {
		var e batchEntryJSON
		if err := json.Unmarshal([]byte(fmt.Sprint(res[i+2])), &e); err != nil {
			return nil, nil, fmt.Errorf("scheduler: batch entry %v: %w", res[i+1], err)
		}
		id := fmt.Sprint(res[i+1])
		if fmt.Sprint(res[i]) == "b" {
			bs = append(bs, BatchEntry{ID: id, Jobs: batchJobs(e.Jobs), Adopted: e.Adopted == 1, Claims: e.Claims, Cancel: e.Cancel == 1})
		} else {
			cs = append(cs, BatchClaim{ID: id, At: time.UnixMilli(int64(e.At)), Jobs: batchJobs(e.Jobs), Adopted: e.Adopts})
		}
	}
	return bs, cs, nil
}

// MarkBatchCanceled records that the upstream was asked to cancel batch
// id; false when it was before.
func (s *Scheduler) MarkBatchCanceled(ctx context.Context, g, id string) (bool, error) {
	res, err := s.batch(ctx, g, "cancel", id)
	if err != nil || len(res) == 0 {
		return false, err
	}
	return toInt(res[0]) == 1, nil
}

// BatchDone forgets batch id: its results are all in.
func (s *Scheduler) BatchDone(ctx context.Context, g, id string) error {
	_, err := s.batch(ctx, g, "done", id)
	return err
}

// BatchRunning is how many of batch id's jobs still run (none: every one
// was canceled, and the batch may be canceled upstream).
func (s *Scheduler) BatchRunning(ctx context.Context, g, id string) (int, error) {
	res, err := s.batch(ctx, g, "running", id)
	if err != nil || len(res) == 0 {
		return 0, err
	}
	return toInt(res[0]), nil
}

// HasBatch reports whether the group knows batch id (a recorded batch or
// an adopted one).
func (s *Scheduler) HasBatch(ctx context.Context, g, id string) (bool, error) {
	return s.rdb.HExists(ctx, keys{g}.batches(), id).Result()
}

// StartBatched opens the attempt of a job sent in batch id: the job is
// running, its followers get `started` (saying so), and its record names
// the batch.
func (s *Scheduler) StartBatched(ctx context.Context, a Attempt, batchID string, at time.Time) (int, error) {
	st, err := s.apply(ctx, a.Group, a.Job, plan{
		From: []jobs.Status{jobs.Running}, To: jobs.Running,
		Dispatch: a.Dispatch, Open: a.Dispatch, Event: "started",
	}, json.RawMessage(fmt.Sprintf(`{"attempt":"__ATTEMPTS__","dispatched_via":"batch","batch_id":%q}`, batchID)),
		"?started_at", jobs.MillisString(at), "batch_id", batchID)
	return st.Attempts, err
}

// ExpireBatched ends a job whose batch expired (24 hours) before its
// request was processed, with err saying so.
func (s *Scheduler) ExpireBatched(ctx context.Context, f Failure) error {
	eb, err := json.Marshal(f.Error)
	if err != nil {
		return err
	}
	_, err = s.apply(ctx, f.Group, f.Job, plan{
		From: []jobs.Status{jobs.Running}, To: jobs.Expired, Event: "expired", Dispatch: f.Dispatch, Close: f.Dispatch,
		Used: used(f.Used), RPH: f.Policy.RequestsPerHour, TPH: f.Policy.TokensPerHour, Tallies: tallies(f.Tallies),
	}, map[string]any{"error": f.Error}, "error", string(eb), "finished_at", jobs.MillisString(f.At))
	return err
}
