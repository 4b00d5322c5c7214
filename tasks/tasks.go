// Package tasks is the wire contract between the api and the worker: the task
// type names, their payloads and constructors. It imports only the standard
// library and asynq, and it stays small: a payload carries ids, never a prompt
// or a secret (the job record in Redis holds the request).
package tasks

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/hibiken/asynq"
)

// TypeRunJob runs one job: one upstream call (with its retries) for one
// queued chat request.
const TypeRunJob = "job:run"

// QueuePrefix prefixes the asynq queue of a model group: "group:<name>".
const QueuePrefix = "group:"

// Queue is the asynq queue that holds a model group's runnable jobs.
func Queue(group string) string { return QueuePrefix + group }

// RunJob is the payload of TypeRunJob: one dispatch of one job.
type RunJob struct {
	JobID    string `json:"job_id"`
	Group    string `json:"group"`
	Dispatch int    `json:"dispatch"` // 1 for the first dispatch, 2 after a retry…
}

// TaskID is the asynq task id of a dispatch: the job id for the first, the
// job id and the dispatch number for later ones. asynq refuses a second task
// with the same id, so each dispatch is handed over at most once.
func (p RunJob) TaskID() string {
	if p.Dispatch <= 1 {
		return p.JobID
	}
	return fmt.Sprintf("%s.%d", p.JobID, p.Dispatch)
}

// RunJobOptions are how a job is enqueued.
type RunJobOptions struct {
	// MaxRetry is asynq's retry budget for a task whose handler failed for
	// an internal reason (Redis unreachable). Upstream retries do not use
	// it: a failed attempt goes back to the fair queue and is dispatched
	// again as a new task. At least 1.
	MaxRetry int
	// Timeout bounds one attempt.
	Timeout time.Duration
	// Retention keeps the finished task visible in asynqmon.
	Retention time.Duration
}

// NewRunJob builds the task for a dispatch of a job (see RunJob.TaskID): a
// second enqueue of the same dispatch gets asynq.ErrTaskIDConflict.
func NewRunJob(p RunJob, o RunJobOptions) (*asynq.Task, error) {
	if p.JobID == "" || p.Group == "" {
		return nil, fmt.Errorf("tasks: run job needs a job id and a group")
	}
	b, err := json.Marshal(p)
	if err != nil {
		return nil, err
	}
	if o.MaxRetry < 1 {
		o.MaxRetry = 1
	}
	opts := []asynq.Option{
		asynq.TaskID(p.TaskID()),
		asynq.Queue(Queue(p.Group)),
		asynq.MaxRetry(o.MaxRetry),
	}
	if o.Timeout > 0 {
		opts = append(opts, asynq.Timeout(o.Timeout))
	}
	if o.Retention > 0 {
		opts = append(opts, asynq.Retention(o.Retention))
	}
	return asynq.NewTask(TypeRunJob, b, opts...), nil
}

// ParseRunJob reads a TypeRunJob payload.
func ParseRunJob(t *asynq.Task) (RunJob, error) {
	var p RunJob
	if err := json.Unmarshal(t.Payload(), &p); err != nil {
		return p, fmt.Errorf("tasks: bad %s payload: %w", TypeRunJob, err)
	}
	if p.JobID == "" || p.Group == "" {
		return p, fmt.Errorf("tasks: %s payload lacks job_id or group", TypeRunJob)
	}
	return p, nil
}

// FormatPayload is how the ops dashboard (asynqmon) shows a task's payload:
// a job's id, group and dispatch number, and for anything else only its
// size. A payload's bytes are never shown as they are, so nothing a future
// task type carried (a prompt is personal data) could leak there.
func FormatPayload(taskType string, payload []byte) string {
	if taskType == TypeRunJob {
		var p RunJob
		if err := json.Unmarshal(payload, &p); err == nil && p.JobID != "" {
			return fmt.Sprintf("job %s · group %s · dispatch %d", p.JobID, p.Group, p.Dispatch)
		}
	}
	return fmt.Sprintf("(%d bytes, not shown)", len(payload))
}

// FormatResult is how the ops dashboard shows a task's result: sluice's
// tasks write none (results live in the job record), so only a size.
func FormatResult(_ string, result []byte) string {
	return fmt.Sprintf("(%d bytes, not shown)", len(result))
}
