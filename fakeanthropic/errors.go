package fakeanthropic

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
)

// Error types of the Anthropic API (error.type in an error body).
const (
	typeInvalidRequest = "invalid_request_error"
	typeAuthentication = "authentication_error"
	typePermission     = "permission_error"
	typeNotFound       = "not_found_error"
	typeRateLimit      = "rate_limit_error"
	typeAPIError       = "api_error"
	typeOverloaded     = "overloaded_error"
	typeTimeout        = "timeout_error"
)

// Error codes (error.details.error_code).
const (
	codeSpendLimit = "enforced_spend_limit_reached"
	codeRampLimit  = "ramp_limit_exceeded"
)

// apiError is an error answer of the API. Every refusal of the fake is one,
// and writeError is the one place that turns it into HTTP.
type apiError struct {
	status  int
	typ     string
	code    string // error.details.error_code, "" for none
	message string
	// retryAfter is the retry-after header in seconds; 0 sends none.
	retryAfter int
	// shouldRetry is the x-should-retry header: "true", "false" or "" for none.
	shouldRetry string
}

func (e *apiError) Error() string { return fmt.Sprintf("%d %s: %s", e.status, e.typ, e.message) }

func invalidRequest(format string, args ...any) *apiError {
	return &apiError{status: http.StatusBadRequest, typ: typeInvalidRequest, message: fmt.Sprintf(format, args...)}
}

// errorBody is the JSON of an error answer, also sent as the data of a
// mid-stream `event: error`.
type errorBody struct {
	Type      string      `json:"type"`
	Error     errorObject `json:"error"`
	RequestID string      `json:"request_id,omitempty"`
}

type errorObject struct {
	Type    string        `json:"type"`
	Message string        `json:"message"`
	Details *errorDetails `json:"details,omitempty"`
}

type errorDetails struct {
	ErrorCode string `json:"error_code"`
}

func (e *apiError) body(requestID string) errorBody {
	b := errorBody{Type: "error", Error: errorObject{Type: e.typ, Message: e.message}, RequestID: requestID}
	if e.code != "" {
		b.Error.Details = &errorDetails{ErrorCode: e.code}
	}
	return b
}

// writeError writes e with the headers it calls for. The request-id header
// must already be set.
func writeError(w http.ResponseWriter, e *apiError) {
	h := w.Header()
	if e.retryAfter > 0 {
		h.Set("retry-after", strconv.Itoa(e.retryAfter))
	}
	if e.shouldRetry != "" {
		h.Set("x-should-retry", e.shouldRetry)
	}
	writeJSON(w, e.status, e.body(h.Get("request-id")))
}

// writeTooLarge writes the 413 that the CDN in front of the API sends: a
// different shape, without "type":"error" or a request_id.
func writeTooLarge(w http.ResponseWriter) {
	writeJSON(w, http.StatusRequestEntityTooLarge, map[string]map[string]string{
		"error": {"type": "request_too_large", "message": "Request exceeds the maximum size"},
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		// Only our own types are written; they always marshal.
		panic(fmt.Sprintf("fakeanthropic: marshal %T: %v", v, err))
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}
