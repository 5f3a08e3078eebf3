package s3store

import (
	"bytes"
	"context"

	"github.com/minio/minio-go/v7"
)

// Replace stores body under name only if the object there still has the
// ETag etag (If-Match): the refresh or takeover of a lock that must fail
// when another writer changed it meanwhile. A changed object gives an
// error matching fs.ErrExist, a missing one fs.ErrNotExist (or
// fs.ErrExist: stores differ); a store that ignores the condition lets
// the last writer win, as with Create.
func (s *Store) Replace(ctx context.Context, name string, body []byte, etag string) (Info, error) {
	key, err := s.key(name)
	if err != nil {
		return Info{}, err
	}
	var opts minio.PutObjectOptions
	opts.SetMatchETag(etag)
	return s.putOne(ctx, name, key, bytes.NewReader(body), int64(len(body)), opts)
}
