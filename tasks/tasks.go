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

// RunJob is the payload of TypeRunJob.
type RunJob struct {
	JobID string `json:"job_id"`
	Group string `json:"group"`
}

// RunJobOptions are how a job is enqueued.
type RunJobOptions struct {
	// MaxRetry is asynq's retry budget for failures. Rate-limit waits do not
	// consume it (the worker's IsFailure says so), but asynq archives a task
	// whose budget is exhausted before asking, so it must be at least 1.
	MaxRetry int
	// Timeout bounds one attempt.
	Timeout time.Duration
	// Retention keeps the finished task visible in asynqmon.
	Retention time.Duration
}

// NewRunJob builds the task for a job. Its TaskID is the job id, so a job is
// handed to asynq at most once: a second enqueue gets asynq.ErrTaskIDConflict.
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
		asynq.TaskID(p.JobID),
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
