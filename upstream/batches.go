package upstream

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/anthropics/anthropic-sdk-go/v2/option"
)

// The Message Batches API: many Messages requests sent as one batch,
// answered within 24 hours at half the price, outside the Messages API's
// per-minute limits. The client below creates, polls, reads and cancels
// batches; its failures are classified like Stream's.

// BatchRequest is one request of a batch: CustomID names it in the
// results (1 to 64 characters of [a-zA-Z0-9_-], unique in the batch), Body
// is a complete Messages request (its "stream" field is dropped: a batch
// does not stream).
type BatchRequest struct {
	CustomID string
	Body     json.RawMessage
}

// Batch is a batch's state.
type Batch struct {
	ID string
	// Status is in_progress, canceling or ended.
	Status    string
	Counts    BatchCounts
	CreatedAt time.Time
	EndedAt   time.Time // zero until it ended
	ExpiresAt time.Time
}

// Ended reports whether every request of the batch has its result.
func (b Batch) Ended() bool { return b.Status == string(anthropic.MessageBatchProcessingStatusEnded) }

// BatchCounts counts a batch's requests by state.
type BatchCounts struct {
	Processing, Succeeded, Errored, Canceled, Expired int
}

// BatchResult is one request's outcome, when its batch has ended.
type BatchResult struct {
	CustomID string
	// Type is succeeded, errored, canceled or expired.
	Type string
	// Message is the answer (Type succeeded), as the non-streaming
	// Messages API returns it; Text its text blocks joined, Usage its usage.
	Message json.RawMessage
	Text    string
	Usage   Usage
	// ErrorType and ErrorMessage say why a request errored (Type errored),
	// as the Messages API would have (e.g. invalid_request_error).
	ErrorType, ErrorMessage string
}

// CreateBatch submits reqs as one batch.
func (c *Client) CreateBatch(ctx context.Context, reqs []BatchRequest) (Batch, error) {
	type item struct {
		CustomID string          `json:"custom_id"`
		Params   json.RawMessage `json:"params"`
	}
	items := make([]item, len(reqs))
	for i, r := range reqs {
		var m map[string]json.RawMessage
		if err := json.Unmarshal(r.Body, &m); err != nil {
			return Batch{}, &Error{Kind: KindFatal, Message: fmt.Sprintf("batch request %s is not a JSON object: %v", r.CustomID, err)}
		}
		delete(m, "stream")
		params, err := json.Marshal(m)
		if err != nil {
			return Batch{}, err
		}
		items[i] = item{CustomID: r.CustomID, Params: params}
	}
	body, err := json.Marshal(map[string]any{"requests": items})
	if err != nil {
		return Batch{}, err
	}
	var resp *http.Response
	b, err := c.sdk.Messages.Batches.New(ctx, anthropic.MessageBatchNewParams{},
		option.WithRequestBody("application/json", body), option.WithResponseInto(&resp))
	if err != nil {
		return Batch{}, classify(ctx, err, resp)
	}
	return batchOf(b), nil
}

// GetBatch reads a batch's state.
func (c *Client) GetBatch(ctx context.Context, id string) (Batch, error) {
	var resp *http.Response
	b, err := c.sdk.Messages.Batches.Get(ctx, id, anthropic.MessageBatchGetParams{}, option.WithResponseInto(&resp))
	if err != nil {
		return Batch{}, classify(ctx, err, resp)
	}
	return batchOf(b), nil
}

// CancelBatch asks the upstream to stop a batch: requests not yet
// processed end canceled; the batch is "canceling" until it has ended.
func (c *Client) CancelBatch(ctx context.Context, id string) (Batch, error) {
	var resp *http.Response
	b, err := c.sdk.Messages.Batches.Cancel(ctx, id, anthropic.MessageBatchCancelParams{}, option.WithResponseInto(&resp))
	if err != nil {
		return Batch{}, classify(ctx, err, resp)
	}
	return batchOf(b), nil
}

// BatchResults reads an ended batch's results (JSON Lines, in no
// particular order) and calls each with every one. An error from each
// stops the reading and is returned.
func (c *Client) BatchResults(ctx context.Context, id string, each func(BatchResult) error) error {
	var resp *http.Response
	stream := c.sdk.Messages.Batches.ResultsStreaming(ctx, id, anthropic.MessageBatchResultsParams{}, option.WithResponseInto(&resp))
	defer stream.Close()
	for stream.Next() {
		r := stream.Current()
		out := BatchResult{CustomID: r.CustomID, Type: r.Result.Type}
		switch r.Result.Type {
		case "succeeded":
			raw := r.Result.JSON.Message.Raw()
			out.Message = json.RawMessage(raw)
			var m struct {
				Content []struct {
					Type string `json:"type"`
					Text string `json:"text"`
				} `json:"content"`
				Usage Usage `json:"usage"`
			}
			if err := json.Unmarshal([]byte(raw), &m); err != nil {
				return &Error{Kind: KindCut, Message: fmt.Sprintf("batch %s: result %s is not a Message: %v", id, r.CustomID, err)}
			}
			for _, b := range m.Content {
				if b.Type == "text" {
					out.Text += b.Text
				}
			}
			out.Usage = m.Usage
		case "errored":
			out.ErrorType, out.ErrorMessage = r.Result.Error.Error.Type, r.Result.Error.Error.Message
		}
		if err := each(out); err != nil {
			return err
		}
	}
	if err := stream.Err(); err != nil {
		return classify(ctx, err, resp)
	}
	return nil
}

// batchListPage is how many batches ListBatches asks for per page.
const batchListPage = 100

// ListBatches returns every batch created at or after since, newest first.
// It follows the API's pages (newest first, each next one through
// after_id) and stops at the first page that reaches a batch older than
// since; a failure on any page is classified like the other calls' and
// returned with nothing else.
func (c *Client) ListBatches(ctx context.Context, since time.Time) ([]Batch, error) {
	params := anthropic.MessageBatchListParams{Limit: anthropic.Int(batchListPage)}
	var out []Batch
	for {
		var resp *http.Response
		page, err := c.sdk.Messages.Batches.List(ctx, params, option.WithResponseInto(&resp))
		if err != nil {
			return nil, classify(ctx, err, resp)
		}
		for i := range page.Data {
			b := &page.Data[i]
			if b.CreatedAt.Before(since) {
				return out, nil
			}
			out = append(out, batchOf(b))
		}
		if !page.HasMore || len(page.Data) == 0 || page.LastID == "" {
			return out, nil
		}
		params.AfterID = anthropic.String(page.LastID)
	}
}

func batchOf(b *anthropic.MessageBatch) Batch {
	rc := b.RequestCounts
	return Batch{ID: b.ID, Status: string(b.ProcessingStatus), CreatedAt: b.CreatedAt, EndedAt: b.EndedAt, ExpiresAt: b.ExpiresAt,
		Counts: BatchCounts{Processing: int(rc.Processing), Succeeded: int(rc.Succeeded), Errored: int(rc.Errored),
			Canceled: int(rc.Canceled), Expired: int(rc.Expired)}}
}
