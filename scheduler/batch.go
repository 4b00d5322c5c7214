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
	ID       string `redis:"job"`
	Dispatch int    `redis:"dispatch"`
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

// batchOp is one op of lua/batch.lua: its name and its arguments (see
// the script's header).
type batchOp interface {
	op() (name string, args []any)
}

// batchIn is lua/batch.lua's input: op on group Group's batches.
type batchIn struct {
	Now   int64
	Group string
	Op    batchOp
}

func (in batchIn) call() ([]string, []any) {
	k := keys{in.Group}
	name, args := in.Op.op()
	return []string{
		k.batchLine(), k.delayed(), k.delayedTags(), k.deadlines(), jobs.WaitingUsersKey(in.Group), k.live(),
		k.batchClaims(), k.batches(), k.batched(),
	}, append([]any{in.Now, name, rkeys.Prefix, rkeys.UserPrefix(in.Group)}, args...)
}

// runBatch runs op on group g's batches; its reply decodes into an Out.
func runBatch[Out any](ctx context.Context, s *Scheduler, g string, op batchOp) (Out, error) {
	out, err := runScript[Out](ctx, s.rdb, nil, "batch", batchScript, batchIn{Now: s.now(), Group: g, Op: op})
	if err != nil {
		name, _ := op.op()
		return out, fmt.Errorf("scheduler: batch %s %s: %w", name, g, err)
	}
	return out, nil
}

// batchTake is the op take.
type batchTake struct {
	Window  int64 // ms
	MaxJobs int
	Claim   string
}

func (o batchTake) op() (string, []any) { return "take", []any{o.Window, o.MaxJobs, o.Claim} }

// batchTakeOut is the op take's reply.
type batchTakeOut struct {
	State  string     `redis:"state"`   // "empty", "wait" or "take"
	WaitMS int64      `redis:"wait_ms"` // wait
	Jobs   []BatchJob `redis:"jobs"`    // take
}

// batchRecord is the op record, or with Adopt the op adopt.
type batchRecord struct {
	Adopt        bool
	Claim, Batch string
	Poll         int64 // ms
}

func (o batchRecord) op() (string, []any) {
	name := "record"
	if o.Adopt {
		name = "adopt"
	}
	return name, []any{o.Claim, o.Batch, o.Poll}
}

// batchRecordOut is the ops record's and adopt's reply.
type batchRecordOut struct {
	Result string `redis:"result"` // "ok", "gone" or "known"
}

// batchReturn is the op return.
type batchReturn struct{ Claim string }

func (o batchReturn) op() (string, []any) { return "return", []any{o.Claim} }

// batchReturnOut is the op return's reply.
type batchReturnOut struct {
	Returned int `redis:"returned"`
}

// batchDue is the op due.
type batchDue struct {
	Check, PollMax int64 // ms
}

func (o batchDue) op() (string, []any) { return "due", []any{o.Check, o.PollMax} }

// batchDueOut is the op due's reply.
type batchDueOut struct {
	Batches []batchDueEntry `redis:"batches"`
	Claims  []batchDueEntry `redis:"claims"`
}

// batchDueEntry is a batch or a claim due for a check: its id and its
// entry as stored (JSON, batchEntryJSON).
type batchDueEntry struct {
	ID    string `redis:"id"`
	Entry string `redis:"entry"`
}

// batchCancel is the op cancel; batchDone the op done; batchRunning the
// op running.
type (
	batchCancel  struct{ Batch string }
	batchDone    struct{ Batch string }
	batchRunning struct{ Batch string }
)

func (o batchCancel) op() (string, []any)  { return "cancel", []any{o.Batch} }
func (o batchDone) op() (string, []any)    { return "done", []any{o.Batch} }
func (o batchRunning) op() (string, []any) { return "running", []any{o.Batch} }

// batchCancelOut, batchDoneOut and batchRunningOut are their replies.
type (
	batchCancelOut struct {
		Marked bool `redis:"marked"` // it was not marked before
	}
	batchDoneOut struct {
		Done bool `redis:"done"`
	}
	batchRunningOut struct {
		Running int `redis:"running"`
	}
)

// TakeBatch takes the group's jobs waiting for a batch under claim, once
// the first has waited window or maxJobs wait. With none to take it
// returns the wait until some may be (0: none wait at all).
func (s *Scheduler) TakeBatch(ctx context.Context, g string, window time.Duration, maxJobs int, claim string) ([]BatchJob, time.Duration, error) {
	out, err := runBatch[batchTakeOut](ctx, s, g, batchTake{Window: window.Milliseconds(), MaxJobs: maxJobs, Claim: claim})
	if err != nil {
		return nil, 0, err
	}
	switch out.State {
	case "wait":
		return nil, time.Duration(out.WaitMS) * time.Millisecond, nil
	case "take":
		return out.Jobs, 0, nil
	}
	return nil, 0, nil
}

// RecordBatch records that the upstream created batch id from claim's
// jobs; its first check is due after poll. It returns false when the
// claim is gone (its jobs were put back in line meanwhile).
func (s *Scheduler) RecordBatch(ctx context.Context, g, claim, id string, poll time.Duration) (bool, error) {
	out, err := runBatch[batchRecordOut](ctx, s, g, batchRecord{Claim: claim, Batch: id, Poll: poll.Milliseconds()})
	return out.Result == "ok", err
}

// AdoptBatch records batch id, found upstream, as possibly holding the
// jobs of claim (whose worker died before recording its batch); false
// when id is a recorded batch (another claim's).
func (s *Scheduler) AdoptBatch(ctx context.Context, g, claim, id string, poll time.Duration) (bool, error) {
	out, err := runBatch[batchRecordOut](ctx, s, g, batchRecord{Adopt: true, Claim: claim, Batch: id, Poll: poll.Milliseconds()})
	return out.Result == "ok", err
}

// ReturnBatch puts claim's jobs that are in no batch back in the batch
// line, where they wait for the next batch (or their fallback time), and
// drops the claim. It returns how many went back.
func (s *Scheduler) ReturnBatch(ctx context.Context, g, claim string) (int, error) {
	out, err := runBatch[batchReturnOut](ctx, s, g, batchReturn{Claim: claim})
	return out.Returned, err
}

// BatchesDue returns the group's batches whose next check is due (pushing
// it back, the wait doubled up to pollMax) and the claims not recorded
// within check of being made or of their last look.
func (s *Scheduler) BatchesDue(ctx context.Context, g string, check, pollMax time.Duration) ([]BatchEntry, []BatchClaim, error) {
	out, err := runBatch[batchDueOut](ctx, s, g, batchDue{Check: check.Milliseconds(), PollMax: pollMax.Milliseconds()})
	if err != nil {
		return nil, nil, err
	}
	var bs []BatchEntry
	var cs []BatchClaim
	for _, d := range out.Batches {
		var e batchEntryJSON
		if err := json.Unmarshal([]byte(d.Entry), &e); err != nil {
			return nil, nil, fmt.Errorf("scheduler: batch entry %v: %w", d.ID, err)
		}
		bs = append(bs, BatchEntry{ID: d.ID, Jobs: batchJobs(e.Jobs), Adopted: e.Adopted == 1, Claims: e.Claims, Cancel: e.Cancel == 1})
	}
	for _, d := range out.Claims {
		var e batchEntryJSON
		if err := json.Unmarshal([]byte(d.Entry), &e); err != nil {
			return nil, nil, fmt.Errorf("scheduler: batch entry %v: %w", d.ID, err)
		}
		cs = append(cs, BatchClaim{ID: d.ID, At: time.UnixMilli(int64(e.At)), Jobs: batchJobs(e.Jobs), Adopted: e.Adopts})
	}
	return bs, cs, nil
}

// MarkBatchCanceled records that the upstream was asked to cancel batch
// id; false when it was before.
func (s *Scheduler) MarkBatchCanceled(ctx context.Context, g, id string) (bool, error) {
	out, err := runBatch[batchCancelOut](ctx, s, g, batchCancel{Batch: id})
	return out.Marked, err
}

// BatchDone forgets batch id: its results are all in.
func (s *Scheduler) BatchDone(ctx context.Context, g, id string) error {
	_, err := runBatch[batchDoneOut](ctx, s, g, batchDone{Batch: id})
	return err
}

// BatchRunning is how many of batch id's jobs still run (none: every one
// was canceled, and the batch may be canceled upstream).
func (s *Scheduler) BatchRunning(ctx context.Context, g, id string) (int, error) {
	out, err := runBatch[batchRunningOut](ctx, s, g, batchRunning{Batch: id})
	return out.Running, err
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
