-- One name per concept: the held lines are `hold` rows (was `reservation`). One row per
-- (order, store, sku): a several-store order may hold one line in several stores. The store of
-- a hold lives on its rows, so stock_order no longer names one store.
-- RENAME keeps the table's grants and privileges (and its data on an existing database).
ALTER TABLE reservation RENAME TO hold;
ALTER TABLE hold RENAME CONSTRAINT reservation_pkey TO hold_pkey;
ALTER TABLE hold RENAME CONSTRAINT reservation_order_id_fkey TO hold_order_id_fkey;
ALTER TABLE hold RENAME CONSTRAINT reservation_store_id_sku_fkey TO hold_store_id_sku_fkey;
ALTER TABLE hold RENAME CONSTRAINT reservation_quantity_check TO hold_quantity_check;
ALTER INDEX reservation_item RENAME TO hold_item;
ALTER TABLE hold DROP CONSTRAINT hold_pkey, ADD CONSTRAINT hold_pkey PRIMARY KEY (order_id, store_id, sku);
ALTER TABLE stock_order DROP COLUMN store_id;
