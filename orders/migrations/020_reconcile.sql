-- The reconciler (orders/reconciler.py) asks stock again about orders left `pending` or
-- `confirming`: `asked_at` is when it last did, so an order is asked at most once per period.
-- Its look is a short scan of the partial index of waiting orders (orders_waiting, migration
-- 040), not a scan of every order ever taken.
ALTER TABLE orders ADD COLUMN IF NOT EXISTS asked_at timestamptz;
