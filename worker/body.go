package worker

import (
	"encoding/json"
	"errors"

	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/upstream"
)

// upstreamBody is the job's request as the upstream gets it: streamed, and
// with metadata.user_id replaced by an opaque hash of tenant and user
// (Anthropic asks for no identifying data there).
func upstreamBody(j *jobs.Job) ([]byte, error) {
	var req map[string]json.RawMessage
	if err := json.Unmarshal(j.Request, &req); err != nil {
		return nil, err
	}
	if req == nil {
		return nil, errors.New("the request is not a JSON object")
	}
	req["stream"] = json.RawMessage("true")
	md, _ := json.Marshal(map[string]string{"user_id": upstream.UserHash(j.Tenant, j.UserID)})
	req["metadata"] = md
	return json.Marshal(req)
}
