package s3store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/sirupsen/logrus"
)

// Part sizes: S3 refuses parts under 5 MiB (but the last) and over 5 GiB,
// and an upload of more than 10,000 parts.
const (
	DefaultPartSize = 16 << 20
	MinPartSize     = 5 << 20
	MaxPartSize     = 5 << 30
	maxParts        = 10000
)

// listPage is how many keys one list request asks for: S3's maximum.
const listPage = 1000

// Config says where the bucket is and how to sign for it.
type Config struct {
	// Endpoint is host[:port] of the S3 API, without a scheme.
	Endpoint string
	// Secure selects https.
	Secure bool
	// Region is the bucket's region; empty lets the client ask the store.
	Region string
	// AccessKey and SecretKey sign the requests; when AccessKey is empty
	// they come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and
	// AWS_SESSION_TOKEN), else from the shared credentials file.
	AccessKey, SecretKey string
	// CredentialsFile is the AWS shared credentials file to read keys
	// from when neither AccessKey nor the environment gives them; empty:
	// AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials (and ~/.aws/config).
	CredentialsFile string
	// Profile is the file's profile; empty: AWS_PROFILE or "default".
	Profile string
	// Bucket must exist.
	Bucket string
	// Prefix is the folder of the bucket that holds the cache ("" for
	// the whole bucket); slashes around it are ignored.
	Prefix string
	// PartSize is the size of one part of a multipart upload and the
	// largest body sent in one PUT (0: DefaultPartSize). A body of unknown
	// size is buffered a part at a time, so it bounds an upload's memory.
	PartSize int64
	// Log receives what goes wrong off the caller's path (an abort that
	// failed); nil logs to logrus's standard logger.
	Log *logrus.Entry
}

// Store is a cache's objects in one bucket under one prefix. It is safe
// for concurrent use.
type Store struct {
	client   *minio.Client
	core     minio.Core
	bucket   string
	prefix   string // "" or ending in "/"
	partSize int64
	log      *logrus.Entry
}

// Info is what a store knows of an object without reading it.
type Info struct {
	// Name is the object's key without the store's prefix.
	Name string
	Size int64
	// ETag changes whenever the object is written again (its content
	// hash for a plain PUT on most stores, not for multipart uploads).
	ETag    string
	ModTime time.Time
}

// New returns the store that cfg describes. It sends no request.
func New(cfg Config) (*Store, error) {
	if cfg.Endpoint == "" || strings.Contains(cfg.Endpoint, "://") {
		return nil, fmt.Errorf("s3 endpoint %q: want host[:port] without a scheme", cfg.Endpoint)
	}
	if cfg.Bucket == "" {
		return nil, errors.New("s3: no bucket given")
	}
	part := cfg.PartSize
	if part == 0 {
		part = DefaultPartSize
	}
	if part < MinPartSize || part > MaxPartSize {
		return nil, fmt.Errorf("s3 part size %d: want %d to %d bytes", part, MinPartSize, MaxPartSize)
	}
	creds := credentials.NewStaticV4(cfg.AccessKey, cfg.SecretKey, "")
	if cfg.AccessKey == "" {
		// The order the AWS tools use: the environment, then the file.
		creds = credentials.NewChainCredentials([]credentials.Provider{
			&credentials.EnvAWS{},
			&credentials.FileAWSCredentials{Filename: cfg.CredentialsFile, Profile: cfg.Profile},
		})
	}
	client, err := minio.New(cfg.Endpoint, &minio.Options{
		Creds:        creds,
		Secure:       cfg.Secure,
		Region:       cfg.Region,
		BucketLookup: minio.BucketLookupPath,
	})
	if err != nil {
		return nil, fmt.Errorf("s3 client for %s: %w", cfg.Endpoint, err)
	}
	prefix := strings.Trim(cfg.Prefix, "/")
	if prefix != "" {
		prefix += "/"
	}
	log := cfg.Log
	if log == nil {
		log = logrus.NewEntry(logrus.StandardLogger())
	}
	return &Store{
		client:   client,
		core:     minio.Core{Client: client},
		bucket:   cfg.Bucket,
		prefix:   prefix,
		partSize: part,
		log:      log.WithFields(logrus.Fields{"endpoint": cfg.Endpoint, "bucket": cfg.Bucket}),
	}, nil
}

// key returns the object key of a cache name, refusing names that would
// not stay beneath the prefix.
func (s *Store) key(name string) (string, error) {
	if name == "" || strings.HasPrefix(name, "/") || strings.Contains("/"+name+"/", "/../") || strings.Contains(name, "//") {
		return "", fmt.Errorf("s3 object name %q: want a relative path without empty or .. parts", name)
	}
	return s.prefix + name, nil
}

// ErrConflict is the error (wrapped) of a Create that raced another
// write of the name and was told to try again (409
// ConditionalRequestConflict, as AWS S3 answers).
var ErrConflict = errors.New("a concurrent write of the object conflicted; try again")

// wrapErr gives a store error the sentinel callers branch on and the
// name it was about.
func wrapErr(op, name string, err error) error {
	if err == nil {
		return nil
	}
	resp := minio.ToErrorResponse(err)
	switch {
	case resp.Code == "NoSuchKey" || resp.StatusCode == http.StatusNotFound && resp.Code != "NoSuchBucket":
		return &fs.PathError{Op: op, Path: name, Err: fs.ErrNotExist}
	case resp.StatusCode == http.StatusPreconditionFailed:
		return &fs.PathError{Op: op, Path: name, Err: fs.ErrExist}
	case resp.StatusCode == http.StatusConflict && resp.Code == "ConditionalRequestConflict":
		return &fs.PathError{Op: op, Path: name, Err: ErrConflict}
	}
	return fmt.Errorf("s3 %s %s: %w", op, name, err)
}

// Stat returns what the store knows of name; an error matching
// fs.ErrNotExist when there is no such object.
func (s *Store) Stat(ctx context.Context, name string) (Info, error) {
	key, err := s.key(name)
	if err != nil {
		return Info{}, err
	}
	oi, err := s.core.StatObject(ctx, s.bucket, key, minio.StatObjectOptions{})
	if err != nil {
		return Info{}, wrapErr("stat", name, err)
	}
	return Info{Name: name, Size: oi.Size, ETag: oi.ETag, ModTime: oi.LastModified}, nil
}

// Get opens name for reading from byte off, n bytes (to the end when n is
// negative). The Info has the whole object's size. Reading past the end
// fails with an error; a missing object with one matching fs.ErrNotExist.
func (s *Store) Get(ctx context.Context, name string, off, n int64) (io.ReadCloser, Info, error) {
	key, err := s.key(name)
	if err != nil {
		return nil, Info{}, err
	}
	if off < 0 || n == 0 {
		return nil, Info{}, fmt.Errorf("s3 get %s: bad range: offset %d, length %d", name, off, n)
	}
	var opts minio.GetObjectOptions
	switch {
	case n > 0:
		err = opts.SetRange(off, off+n-1)
	case off > 0:
		err = opts.SetRange(off, 0)
	}
	if err != nil {
		return nil, Info{}, fmt.Errorf("s3 get %s: %w", name, err)
	}
	body, oi, h, err := s.core.GetObject(ctx, s.bucket, key, opts)
	if err != nil {
		return nil, Info{}, wrapErr("get", name, err)
	}
	info := Info{Name: name, Size: oi.Size, ETag: oi.ETag, ModTime: oi.LastModified}
	if cr := h.Get("Content-Range"); cr != "" {
		// "bytes 0-9/100": the whole object's size follows the slash.
		i := strings.LastIndexByte(cr, '/')
		size, err := strconv.ParseInt(cr[i+1:], 10, 64)
		if i < 0 || err != nil {
			body.Close()
			return nil, Info{}, fmt.Errorf("s3 get %s: malformed Content-Range %q", name, cr)
		}
		info.Size = size
	}
	return body, info, nil
}
